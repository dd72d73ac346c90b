//! The supervisor's handling of a notify message from the guest's init
//! (`READY=1`, `STOPPING=1`), `supervisor::notify_transitions`.
//!
//! Invariants: only the two lines move a machine, each only where it is a
//! legal step (starting to running, anything else to stopping), and never
//! more steps than the message has such lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rmachines::runtime::protocol::MachineState;
use rmachines::runtime::supervisor::notify_transitions;

fuzz_target!(|data: &[u8]| {
    let lines = String::from_utf8_lossy(data);
    let ready = lines.lines().filter(|l| *l == "READY=1").count();
    let stopping = lines.lines().filter(|l| *l == "STOPPING=1").count();
    for start in MachineState::ALL {
        let states = notify_transitions(start, data);
        assert!(states.len() <= 2, "{start:?} -> {states:?}");
        assert!(states.len() <= ready + stopping);
        let mut state = start;
        for next in states {
            match next {
                MachineState::Running => {
                    assert_eq!(state, MachineState::Starting);
                    assert!(ready > 0);
                }
                MachineState::Stopping => {
                    assert_ne!(state, MachineState::Stopping);
                    assert!(stopping > 0);
                }
                other => panic!("notify moved {state:?} to {other:?}"),
            }
            state = next;
        }
    }
});
