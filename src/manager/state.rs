//! The state machine: a machine's snapshot ([`MachineInfo`]) and every
//! transition it goes through, as pure functions over it. Each returns what
//! it changed ([`Change`]); the caller (the manager, under its lock) turns
//! that into an [`Event`](super::Event). No processes, no locks, no clock:
//! the time comes in as an argument, so all of it is unit-tested as is.
//!
//! The states themselves ([`MachineState`]) are the supervisor's, shared
//! with the control protocol; the supervisor decides starting → running →
//! stopping → stopped/failed, the manager follows its statuses
//! ([`MachineInfo::follow`]) and decides the rest here: a start begun, a
//! start that failed before any supervisor ran, a supervisor that died, a
//! definition read again.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::definition::Definition;
use crate::runtime::protocol::{MachineState, Status};

/// A snapshot of one machine, everything the Machine object exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    pub state: MachineState,
    /// Host PID of the machine's init; 0 when not running.
    pub leader: u32,
    pub root: String,
    /// Path of the definition file.
    pub definition: String,
    pub addresses: Vec<String>,
    pub autostart: bool,
    /// Realtime microseconds of the last state change.
    pub since: u64,
    /// Why the definition is invalid or the last start/run failed; empty if none.
    pub error: String,
}

/// What a transition changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Nothing,
    /// The state (and maybe more): listeners get `StateChanged`.
    State,
    /// Another property (addresses, leader, error, ...): `InfoChanged`.
    Info,
}

/// A start refused: a supervisor runs or the state is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AlreadyActive;

/// Where a start stands, after the supervisor's latest status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartProgress {
    /// Nothing decided yet: wait for the next status.
    Pending,
    /// Init was executed: the start is done.
    Started,
    /// The machine ended before init ran; why.
    Failed(String),
}

impl MachineInfo {
    /// A machine as its definition file makes it: stopped, or failed with
    /// why the definition is invalid.
    pub(crate) fn defined(
        name: &str,
        file: &Path,
        definition: &Result<Definition, String>,
        now: u64,
    ) -> MachineInfo {
        let (root, autostart, error, state) = match definition {
            Ok(def) => (
                def.root.display().to_string(),
                def.autostart,
                String::new(),
                MachineState::Stopped,
            ),
            Err(err) => (String::new(), false, err.clone(), MachineState::Failed),
        };
        MachineInfo {
            name: name.to_owned(),
            state,
            leader: 0,
            root,
            definition: file.display().to_string(),
            addresses: Vec::new(),
            autostart,
            since: now,
            error,
        }
    }

    /// A start begins: `starting`, the last error cleared. Refused while a
    /// supervisor runs (`supervised`) or the state is active.
    pub(crate) fn begin_start(&mut self, supervised: bool, now: u64) -> Result<(), AlreadyActive> {
        if supervised || self.state.is_active() {
            return Err(AlreadyActive);
        }
        self.state = MachineState::Starting;
        self.since = now;
        self.error.clear();
        Ok(())
    }

    /// The manager sets a state itself (a start that failed before any
    /// supervisor ran). Any difference counts as a state change.
    pub(crate) fn set(&mut self, state: MachineState, error: String, now: u64) -> Change {
        let changed = self.state != state || self.error != error;
        if self.state != state {
            self.since = now;
        }
        self.state = state;
        self.error = error;
        if changed {
            Change::State
        } else {
            Change::Nothing
        }
    }

    /// Follows a supervisor's status. `addresses` are the plan's, shown
    /// while the machine is active. A stopped machine keeps the error of
    /// its failure until its state changes again.
    pub(crate) fn follow(&mut self, status: &Status, addresses: Vec<String>) -> Change {
        let addresses = if status.state.is_active() {
            addresses
        } else {
            Vec::new()
        };
        let changed_state = self.state != status.state;
        let changed_other = self.leader != status.leader
            || self.error != status.error
            || self.addresses != addresses;
        self.addresses = addresses;
        self.state = status.state;
        self.leader = status.leader;
        if status.state != MachineState::Stopped || self.error.is_empty() || changed_state {
            self.error = status.error.clone();
        }
        if changed_state {
            self.since = status.since;
            Change::State
        } else if changed_other {
            Change::Info
        } else {
            Change::Nothing
        }
    }

    /// The definition file was read again (`old` was the last reading,
    /// `fresh` the snapshot the new one makes). A stopped machine shows a
    /// broken file as `failed` and a repaired one as `stopped`; a running
    /// machine keeps what it was started with, its error showing a file it
    /// could not start again with until the file is fixed.
    pub(crate) fn redefine(
        &mut self,
        old: &Result<Definition, String>,
        new: &Result<Definition, String>,
        fresh: MachineInfo,
        supervised: bool,
    ) -> Change {
        let before = self.clone();
        self.root = fresh.root;
        self.autostart = fresh.autostart;
        self.definition = fresh.definition;
        if !supervised {
            match (old, new) {
                (_, Err(_)) => {
                    self.state = MachineState::Failed;
                    self.error = fresh.error;
                }
                (Err(_), Ok(_)) => {
                    self.state = MachineState::Stopped;
                    self.error.clear();
                }
                (Ok(_), Ok(_)) => {}
            }
        } else {
            match (old, new) {
                (_, Err(error)) => self.error = error.clone(),
                (Err(old), Ok(_)) if *old == self.error => self.error.clear(),
                _ => {}
            }
        }
        if before.state != self.state {
            Change::State
        } else if *self != before {
            Change::Info
        } else {
            Change::Nothing
        }
    }
}

/// Where a start stands after `status` (`None`: no status yet).
/// `boots`: init was executed, even if it ended before we looked (a
/// command that exits at once).
pub(crate) fn start_progress(status: Option<&Status>) -> StartProgress {
    let Some(st) = status else {
        return StartProgress::Pending;
    };
    if st.leader != 0 || st.state == MachineState::Running || st.boots > 0 {
        return StartProgress::Started;
    }
    if st.state.is_active() {
        return StartProgress::Pending;
    }
    StartProgress::Failed(if st.error.is_empty() {
        format!("machine ended while starting ({})", st.state)
    } else {
        st.error.clone()
    })
}

/// The last status of a supervisor that went away: what it recorded (its
/// state file), else `failed`. A supervisor gone while its machine was
/// active died: the machine is `failed`, pointing at the supervisor's
/// `log`. Returns the status and whether it died.
pub(crate) fn final_status(recorded: Option<Status>, log: &Path, now: u64) -> (Status, bool) {
    let mut last = recorded.unwrap_or(Status {
        state: MachineState::Failed,
        leader: 0,
        supervisor: 0,
        since: now,
        error: "the supervisor exited without a final state".into(),
        boots: 0,
    });
    let died = last.state.is_active();
    if died {
        last.state = MachineState::Failed;
        last.error = format!("the supervisor died unexpectedly; see {}", log.display());
    }
    last.leader = 0;
    (last, died)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> Definition {
        crate::definition::parse_definition(
            "web",
            Path::new("/etc/rmachines/web.toml"),
            "root = \"/srv/web\"\n",
        )
        .expect("a valid definition")
    }

    fn stopped() -> MachineInfo {
        MachineInfo::defined(
            "web",
            Path::new("/etc/rmachines/web.toml"),
            &Ok(definition()),
            1,
        )
    }

    fn status(state: MachineState, leader: u32) -> Status {
        Status {
            state,
            leader,
            supervisor: 9,
            since: 5,
            error: String::new(),
            boots: 0,
        }
    }

    #[test]
    fn a_definition_makes_a_stopped_or_failed_machine() {
        let info = stopped();
        assert_eq!(info.state, MachineState::Stopped);
        assert_eq!(info.root, "/srv/web");
        let broken = MachineInfo::defined("web", Path::new("/x.toml"), &Err("bad".into()), 1);
        assert_eq!(broken.state, MachineState::Failed);
        assert_eq!(broken.error, "bad");
    }

    #[test]
    fn a_start_is_refused_while_active_or_supervised() {
        let mut info = stopped();
        info.error = "earlier failure".into();
        assert_eq!(info.begin_start(false, 7), Ok(()));
        assert_eq!(info.state, MachineState::Starting);
        assert_eq!(info.since, 7);
        assert!(info.error.is_empty());
        assert_eq!(info.begin_start(false, 8), Err(AlreadyActive));
        let mut other = stopped();
        assert_eq!(other.begin_start(true, 8), Err(AlreadyActive));
        assert_eq!(other.state, MachineState::Stopped);
    }

    #[test]
    fn following_statuses_tells_state_from_info_changes() {
        let mut info = stopped();
        let addresses = vec!["10.0.0.2/24".to_owned()];
        let running = status(MachineState::Running, 42);
        assert_eq!(info.follow(&running, addresses.clone()), Change::State);
        assert_eq!((info.leader, info.since), (42, 5));
        assert_eq!(info.addresses, addresses);
        assert_eq!(info.follow(&running, addresses.clone()), Change::Nothing);
        // A reboot: same state, new leader.
        assert_eq!(
            info.follow(&status(MachineState::Running, 43), addresses.clone()),
            Change::Info
        );
        // Stopped: no addresses, no leader.
        assert_eq!(
            info.follow(&status(MachineState::Stopped, 0), addresses),
            Change::State
        );
        assert!(info.addresses.is_empty());
        assert_eq!(info.leader, 0);
    }

    #[test]
    fn a_stopped_machine_keeps_its_failure_until_the_state_changes() {
        let mut info = stopped();
        let mut failed = status(MachineState::Stopped, 0);
        failed.error = "init exited with 1".into();
        info.state = MachineState::Running;
        assert_eq!(info.follow(&failed, vec![]), Change::State);
        assert_eq!(info.error, "init exited with 1");
        // A later stopped status without an error does not wipe it.
        info.follow(&status(MachineState::Stopped, 0), vec![]);
        assert_eq!(info.error, "init exited with 1");
    }

    #[test]
    fn set_counts_any_difference_as_a_state_change() {
        let mut info = stopped();
        assert_eq!(
            info.set(MachineState::Stopped, String::new(), 9),
            Change::Nothing
        );
        assert_eq!(
            info.set(MachineState::Stopped, "why".into(), 9),
            Change::State
        );
        assert_eq!(info.since, 1, "same state: since unchanged");
        assert_eq!(
            info.set(MachineState::Failed, "why".into(), 9),
            Change::State
        );
        assert_eq!(info.since, 9);
    }

    #[test]
    fn redefining_a_stopped_machine_breaks_and_repairs_it() {
        let good: Result<Definition, String> = Ok(definition());
        let bad: Result<Definition, String> = Err("bogus key".into());
        let file = Path::new("/etc/rmachines/web.toml");
        let mut info = stopped();
        let fresh = MachineInfo::defined("web", file, &bad, 2);
        assert_eq!(info.redefine(&good, &bad, fresh, false), Change::State);
        assert_eq!(
            (info.state, info.error.as_str()),
            (MachineState::Failed, "bogus key")
        );
        let fresh = MachineInfo::defined("web", file, &good, 3);
        assert_eq!(info.redefine(&bad, &good, fresh, false), Change::State);
        assert_eq!(
            (info.state, info.error.as_str()),
            (MachineState::Stopped, "")
        );
        let fresh = MachineInfo::defined("web", file, &good, 4);
        assert_eq!(info.redefine(&good, &good, fresh, false), Change::Nothing);
    }

    #[test]
    fn redefining_a_running_machine_only_shows_the_error() {
        let good: Result<Definition, String> = Ok(definition());
        let bad: Result<Definition, String> = Err("bogus key".into());
        let file = Path::new("/etc/rmachines/web.toml");
        let mut info = stopped();
        info.state = MachineState::Running;
        let fresh = MachineInfo::defined("web", file, &bad, 2);
        assert_eq!(info.redefine(&good, &bad, fresh, true), Change::Info);
        assert_eq!(
            (info.state, info.error.as_str()),
            (MachineState::Running, "bogus key")
        );
        let fresh = MachineInfo::defined("web", file, &good, 3);
        assert_eq!(info.redefine(&bad, &good, fresh, true), Change::Info);
        assert!(info.error.is_empty());
    }

    #[test]
    fn a_start_waits_for_init_or_reports_why_it_ended() {
        assert_eq!(start_progress(None), StartProgress::Pending);
        let starting = status(MachineState::Starting, 0);
        assert_eq!(start_progress(Some(&starting)), StartProgress::Pending);
        assert_eq!(
            start_progress(Some(&status(MachineState::Starting, 3))),
            StartProgress::Started
        );
        let mut quick = status(MachineState::Stopped, 0);
        quick.boots = 1;
        assert_eq!(start_progress(Some(&quick)), StartProgress::Started);
        assert_eq!(
            start_progress(Some(&status(MachineState::Failed, 0))),
            StartProgress::Failed("machine ended while starting (failed)".into())
        );
        let mut why = status(MachineState::Failed, 0);
        why.error = "no init".into();
        assert_eq!(
            start_progress(Some(&why)),
            StartProgress::Failed("no init".into())
        );
    }

    #[test]
    fn a_supervisor_gone_while_active_died() {
        let log = Path::new("/run/rmachines/web/supervisor.log");
        let (last, died) = final_status(Some(status(MachineState::Running, 42)), log, 9);
        assert!(died);
        assert_eq!(last.state, MachineState::Failed);
        assert_eq!(last.leader, 0);
        assert!(last.error.contains("supervisor.log"), "{}", last.error);
        let (last, died) = final_status(Some(status(MachineState::Stopped, 0)), log, 9);
        assert!(!died);
        assert_eq!(last.state, MachineState::Stopped);
        let (last, died) = final_status(None, log, 9);
        assert!(!died);
        assert_eq!((last.state, last.since), (MachineState::Failed, 9));
    }
}
