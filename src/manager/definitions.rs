//! Following the definition directory: a reload reads it, asks
//! [`reload::diff`] what to do and applies the actions (snapshots through
//! the state machine, new limits to running machines, forgotten machines'
//! registry entries given back).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::link::SupervisorLink;
use super::{
    change_event, io_err, plan, reload, Entry, Event, MachineInfo, Manager, ManagerError,
    ReloadSummary,
};
use crate::definition::{load_dir, Definition, Resources};
use crate::runtime::protocol::{now_usec, Command};
use crate::runtime::{self, MachinePlan};

/// The definitions found, by machine name: the file and what it holds.
type Loaded = BTreeMap<String, (PathBuf, Result<Definition, String>)>;

/// New limits for a running machine.
type NewLimits = (String, MachinePlan, Resources, SupervisorLink);

/// What applying a reload's actions leaves to do outside the lock.
#[derive(Default)]
struct Outcome {
    summary: ReloadSummary,
    events: Vec<Event>,
    limits: Vec<NewLimits>,
    forgotten: Vec<String>,
}

impl Manager {
    /// Re-reads the definitions; running machines are not disturbed, except
    /// that they take new `[resources]` at once.
    pub async fn reload(&self) -> Result<ReloadSummary, ManagerError> {
        let mut loaded = self.load_definitions().await?;
        let outcome = {
            let mut machines = self.lock();
            let known = machines
                .iter()
                .map(|(name, entry)| {
                    let known = reload::Known {
                        supervised: entry.supervisor.is_some(),
                        running_with: entry
                            .supervisor
                            .as_ref()
                            .and(entry.plan.as_ref())
                            .map(|plan| plan.definition.resources),
                    };
                    (name.clone(), known)
                })
                .collect();
            let found: Vec<reload::Found<'_>> = loaded
                .iter()
                .map(|(name, (_, definition))| reload::Found {
                    name,
                    resources: definition.as_ref().ok().map(|d| d.resources),
                })
                .collect();
            let actions = reload::diff(&known, &found);
            let mut outcome = Outcome::default();
            for action in actions {
                apply(action, &mut machines, &mut loaded, &mut outcome);
            }
            outcome
        };
        for event in outcome.events {
            self.emit(event);
        }
        self.release(outcome.forgotten).await;
        self.apply_limits(outcome.limits).await?;
        Ok(outcome.summary)
    }

    /// Reads the definition directory (none: no machines).
    async fn load_definitions(&self) -> Result<Loaded, ManagerError> {
        let dir = self.inner.config.config_dir.clone();
        let images = crate::image::images_dir(&self.inner.config.storage_dir);
        let loaded = tokio::task::spawn_blocking(move || load_dir(&dir, &images))
            .await
            .map_err(|source| ManagerError::Task {
                what: "reading the definitions",
                source,
            })?;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                let dir = self.inner.config.config_dir.display();
                return Err(io_err(&format!("reading {dir}"))(err));
            }
        };
        Ok(loaded
            .into_iter()
            .map(|item| {
                let definition = item.result.map_err(|e| e.to_string());
                (item.name, (item.file, definition))
            })
            .collect())
    }

    /// The file is the truth: running machines take their new limits now.
    async fn apply_limits(&self, changed: Vec<NewLimits>) -> Result<(), ManagerError> {
        let mut failures = Vec::new();
        for (name, plan, resources, link) in changed {
            let applied = tokio::task::spawn_blocking(move || {
                runtime::resources::update(&plan, &resources).map(|()| resources)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match applied {
                Ok(resources) => {
                    tracing::info!(machine = name, "applied the new [resources]");
                    if let Some(plan) = self.lock().get_mut(&name).and_then(|e| e.plan.as_mut()) {
                        plan.definition.resources = resources;
                    }
                    link.send(Command::SetResources(resources));
                }
                Err(message) => {
                    tracing::warn!(machine = name, "{message}");
                    failures.push(format!("{name}: {message}"));
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ManagerError::LimitsNotApplied(failures))
        }
    }

    /// Gives back the registry entries (id range, address) of machines
    /// just forgotten: their definition is gone and they are stopped.
    async fn release(&self, forgotten: Vec<String>) {
        if forgotten.is_empty() {
            return;
        }
        let config = self.inner.config.clone();
        let released = tokio::task::spawn_blocking(move || {
            for name in forgotten {
                plan::release(&config, &name);
            }
        })
        .await;
        if let Err(err) = released {
            tracing::warn!(%err, "giving back the registries' entries");
        }
    }

    /// Forgets a stopped machine whose definition file is gone (and gives
    /// back what it held in the registries).
    pub(super) async fn forget_if_undefined(&self, name: &str) {
        let removed = {
            let mut machines = self.lock();
            let file = machines
                .get(name)
                .filter(|e| e.supervisor.is_none())
                .map(|e| PathBuf::from(&e.info.definition));
            match file {
                Some(file) if !file.exists() => machines.remove(name).is_some(),
                _ => false,
            }
        };
        if removed {
            self.emit(Event::MachineRemoved {
                name: name.to_owned(),
            });
            self.release(vec![name.to_owned()]).await;
        }
    }
}

/// Applies one reload action to the table (under the manager's lock).
fn apply(
    action: reload::Action,
    machines: &mut BTreeMap<String, Entry>,
    loaded: &mut Loaded,
    outcome: &mut Outcome,
) {
    match action {
        reload::Action::Add { name } => {
            let Some((file, definition)) = loaded.remove(&name) else {
                return;
            };
            let info = MachineInfo::defined(&name, &file, &definition, now_usec());
            outcome.summary.added.push(name.clone());
            outcome
                .events
                .push(Event::MachineAdded { name: name.clone() });
            machines.insert(name, Entry::new(info, definition));
        }
        reload::Action::Redefine { name } => {
            let (Some((file, definition)), Some(entry)) =
                (loaded.get(&name), machines.get_mut(&name))
            else {
                return;
            };
            let fresh = MachineInfo::defined(&name, file, definition, now_usec());
            let before = entry.info.clone();
            let supervised = entry.supervisor.is_some();
            let change = entry
                .info
                .redefine(&entry.definition, definition, fresh, supervised);
            outcome
                .events
                .extend(change_event(&name, change, before, &entry.info));
            entry.definition = definition.clone();
        }
        reload::Action::ApplyResources { name, resources } => {
            if let Some(Entry {
                supervisor: Some(link),
                plan: Some(plan),
                ..
            }) = machines.get(&name)
            {
                outcome
                    .limits
                    .push((name, plan.clone(), resources, link.clone()));
            }
        }
        reload::Action::Orphan { name } => {
            if let Some(entry) = machines.get_mut(&name) {
                // Keeps running; forgotten when it stops.
                entry.definition = Err("the definition file was removed".into());
            }
        }
        reload::Action::Forget { name } => {
            machines.remove(&name);
            outcome.summary.removed.push(name.clone());
            outcome.forgotten.push(name.clone());
            outcome.events.push(Event::MachineRemoved { name });
        }
    }
}
