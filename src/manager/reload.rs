//! The reload diff, a pure function: what the manager knows (each machine,
//! whether a supervisor runs it, the limits it runs with) and what the
//! definition directory holds now → the actions a reload takes. The
//! manager applies them (`Manager::reload`); the snapshot changes each
//! action makes are the state machine's ([`super::state`]).
//!
//! A reload never starts, stops or restarts a machine: running machines
//! keep running with what they were started with, except their
//! `[resources]`, which the file governs at once.

use std::collections::BTreeMap;

use crate::definition::Resources;

/// A machine the manager knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Known {
    /// A supervisor runs it (starting, running or stopping).
    pub(crate) supervised: bool,
    /// The limits it runs with, when it runs with a plan.
    pub(crate) running_with: Option<Resources>,
}

/// A definition file found by the reload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Found<'a> {
    pub(crate) name: &'a str,
    /// Its limits; `None` when the definition is invalid.
    pub(crate) resources: Option<Resources>,
}

/// What a reload does, in order: found files first (in the order found),
/// then the machines whose file is gone (by name).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// A new definition: a new machine, stopped (or failed with why).
    Add { name: String },
    /// A known machine's file was read again: its snapshot follows it.
    Redefine { name: String },
    /// A running machine's file has other `[resources]`: apply them now.
    ApplyResources { name: String, resources: Resources },
    /// The file is gone and the machine stopped: forget it, and give its
    /// id range and address back.
    Forget { name: String },
    /// The file is gone but the machine runs: it keeps running, and is
    /// forgotten when it stops.
    Orphan { name: String },
}

/// The actions that bring `known` in line with `found`.
pub(crate) fn diff(known: &BTreeMap<String, Known>, found: &[Found<'_>]) -> Vec<Action> {
    let mut actions = Vec::new();
    for file in found {
        let name = file.name.to_owned();
        let Some(machine) = known.get(file.name) else {
            actions.push(Action::Add { name });
            continue;
        };
        actions.push(Action::Redefine { name: name.clone() });
        if let (true, Some(running), Some(wanted)) =
            (machine.supervised, machine.running_with, file.resources)
        {
            if running != wanted {
                actions.push(Action::ApplyResources {
                    name,
                    resources: wanted,
                });
            }
        }
    }
    for (name, machine) in known {
        if found.iter().any(|file| file.name == name) {
            continue;
        }
        let name = name.clone();
        actions.push(if machine.supervised {
            Action::Orphan { name }
        } else {
            Action::Forget { name }
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpu_weight: u16) -> Resources {
        Resources {
            cpu_weight: Some(cpu_weight),
            ..Resources::default()
        }
    }

    fn known(entries: &[(&str, bool, Option<Resources>)]) -> BTreeMap<String, Known> {
        entries
            .iter()
            .map(|(name, supervised, running_with)| {
                (
                    (*name).to_owned(),
                    Known {
                        supervised: *supervised,
                        running_with: *running_with,
                    },
                )
            })
            .collect()
    }

    fn name(n: &str) -> String {
        n.to_owned()
    }

    #[test]
    fn new_files_are_added_and_known_ones_redefined() {
        let known = known(&[("a", false, None)]);
        let found = [
            Found {
                name: "a",
                resources: Some(limits(1)),
            },
            Found {
                name: "b",
                resources: None,
            },
        ];
        assert_eq!(
            diff(&known, &found),
            [
                Action::Redefine { name: name("a") },
                Action::Add { name: name("b") }
            ]
        );
    }

    #[test]
    fn gone_files_forget_stopped_machines_and_orphan_running_ones() {
        let known = known(&[("run", true, Some(limits(1))), ("stop", false, None)]);
        assert_eq!(
            diff(&known, &[]),
            [
                Action::Orphan { name: name("run") },
                Action::Forget { name: name("stop") }
            ]
        );
    }

    #[test]
    fn only_a_running_machine_with_other_limits_gets_them() {
        let known = known(&[
            ("same", true, Some(limits(1))),
            ("other", true, Some(limits(1))),
            ("stopped", false, None),
            ("broken", true, Some(limits(1))),
        ]);
        let found = [
            Found {
                name: "same",
                resources: Some(limits(1)),
            },
            Found {
                name: "other",
                resources: Some(limits(2)),
            },
            Found {
                name: "stopped",
                resources: Some(limits(2)),
            },
            Found {
                name: "broken",
                resources: None,
            },
        ];
        assert_eq!(
            diff(&known, &found),
            [
                Action::Redefine { name: name("same") },
                Action::Redefine {
                    name: name("other")
                },
                Action::ApplyResources {
                    name: name("other"),
                    resources: limits(2)
                },
                Action::Redefine {
                    name: name("stopped")
                },
                Action::Redefine {
                    name: name("broken")
                },
            ]
        );
    }

    #[test]
    fn nothing_known_and_nothing_found_is_no_action() {
        assert!(diff(&BTreeMap::new(), &[]).is_empty());
    }
}
