//! The runtime for real: machines booted as root without the daemon.

mod support;

use std::time::Duration;

use rmachines::runtime::protocol::MachineState;
use support::*;

#[test]
fn busybox_init_is_pid1_in_its_own_namespaces() {
    let root = fixture("busybox");
    let mut m = TestMachine::launch(definition("bb-pid1", &root));
    let status = m.wait_state(MachineState::Running, Duration::from_secs(20));
    assert!(status.leader > 0);
    // init is PID 1 in the guest
    let out = m.sh("cat /proc/1/comm; echo $$");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("init"));
    m.stop();
    let end = m.wait_end(Duration::from_secs(20));
    assert_eq!(end.state, MachineState::Stopped, "{end:?}\n{}", m.console());
    assert_nothing_left(&m);
}
