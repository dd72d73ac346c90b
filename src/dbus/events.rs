//! Forwards the manager's events to the bus: `StateChanged` and `ShellExited`
//! signals, `PropertiesChanged` on Machine objects, and Machine objects added
//! and removed as definitions come and go.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use tokio::sync::broadcast::{self, error::RecvError};
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::Value;
use zbus::Connection;

use super::machine::{MachineObject, INTERFACE as MACHINE_INTERFACE};
use super::manager::ManagerObject;
use super::{machine_path, MANAGER_PATH};
use crate::manager::{Event, MachineInfo, Manager};

pub(super) fn spawn_forwarder(
    connection: Connection,
    manager: Manager,
    events: broadcast::Receiver<Event>,
) {
    let mut forwarder = Forwarder {
        connection,
        served: manager.list().into_iter().map(|info| info.name).collect(),
        manager,
    };
    tokio::spawn(async move { forwarder.run(events).await });
}

/// Keeps no copy of the machines' state: each event carries the snapshots
/// it announces. It only knows which Machine objects it serves.
struct Forwarder {
    connection: Connection,
    /// Serves the Machine objects; asked again only after missed events.
    manager: Manager,
    /// The machines with an object on the bus.
    served: BTreeSet<String>,
}

impl Forwarder {
    async fn run(&mut self, mut events: broadcast::Receiver<Event>) {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Err(error) = self.forward(event).await {
                        tracing::warn!("cannot forward a manager event to the bus: {error}");
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind the manager's events; resynchronising");
                    if let Err(error) = self.resync().await {
                        tracing::warn!("cannot resynchronise the bus objects: {error}");
                    }
                }
                Err(RecvError::Closed) => break,
            }
        }
    }

    async fn forward(&mut self, event: Event) -> zbus::Result<()> {
        match event {
            Event::StateChanged {
                name,
                state,
                before,
                info,
            } => {
                self.announce(Some(&before), &info).await?;
                let emitter = SignalEmitter::new(&self.connection, MANAGER_PATH)?;
                ManagerObject::state_changed(&emitter, &name, state.as_str()).await
            }
            Event::InfoChanged { before, info, .. } => self.announce(Some(&before), &info).await,
            Event::ShellExited { session, status } => {
                let emitter = SignalEmitter::new(&self.connection, MANAGER_PATH)?;
                ManagerObject::shell_exited(&emitter, session, status).await
            }
            Event::MachineAdded { name } => self.add(&name).await,
            Event::MachineRemoved { name } => self.remove(&name).await,
            Event::ImportProgress { name, done, total } => {
                let emitter = SignalEmitter::new(&self.connection, MANAGER_PATH)?;
                ManagerObject::import_progress(&emitter, &name, done, total).await
            }
        }
    }

    async fn add(&mut self, name: &str) -> zbus::Result<()> {
        if self.served.insert(name.to_owned()) {
            MachineObject::serve_at(&self.connection, self.manager.clone(), name).await?;
        }
        Ok(())
    }

    async fn remove(&mut self, name: &str) -> zbus::Result<()> {
        self.served.remove(name);
        MachineObject::remove(&self.connection, name).await?;
        Ok(())
    }

    /// Emits `PropertiesChanged` with every property of `info` that differs
    /// from `before` (all of them without `before`).
    async fn announce(&self, before: Option<&MachineInfo>, info: &MachineInfo) -> zbus::Result<()> {
        let changed = changed_properties(before, info);
        if changed.is_empty() {
            return Ok(());
        }
        let emitter = SignalEmitter::new(&self.connection, machine_path(&info.name))?;
        zbus::fdo::Properties::properties_changed(
            &emitter,
            InterfaceName::from_static_str_unchecked(MACHINE_INTERFACE),
            changed,
            Cow::Borrowed(&[]),
        )
        .await
    }

    /// After missed events: bring the objects in line with the manager's
    /// list and announce every property (what changed meanwhile is unknown).
    async fn resync(&mut self) -> zbus::Result<()> {
        let now = self.manager.list();
        let gone: Vec<String> = self
            .served
            .iter()
            .filter(|name| !now.iter().any(|info| info.name == **name))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name).await?;
        }
        for info in &now {
            if self.served.contains(&info.name) {
                self.announce(None, info).await?;
            } else {
                self.add(&info.name).await?;
            }
        }
        Ok(())
    }
}

/// The Machine properties that change over a machine's life, as bus values.
fn property_values(info: &MachineInfo) -> [(&'static str, Value<'_>); 8] {
    [
        ("State", Value::from(info.state.as_str())),
        ("Leader", Value::from(info.leader)),
        ("Root", Value::from(info.root.as_str())),
        ("Definition", Value::from(info.definition.as_str())),
        ("Addresses", Value::from(info.addresses.clone())),
        ("Autostart", Value::from(info.autostart)),
        ("Since", Value::from(info.since)),
        ("Error", Value::from(info.error.as_str())),
    ]
}

/// The properties of `current` that differ from `previous` (all of them
/// when there is no previous snapshot).
fn changed_properties<'a>(
    previous: Option<&MachineInfo>,
    current: &'a MachineInfo,
) -> HashMap<&'static str, Value<'a>> {
    let before = previous.map(property_values);
    property_values(current)
        .into_iter()
        .enumerate()
        .filter(|(index, (_, value))| {
            before
                .as_ref()
                .is_none_or(|before| before[*index].1 != *value)
        })
        .map(|(_, property)| property)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::MachineState;

    fn info() -> MachineInfo {
        MachineInfo {
            name: "web".into(),
            state: MachineState::Stopped,
            leader: 0,
            root: "/r".into(),
            definition: "/etc/rmachines/web.toml".into(),
            addresses: vec![],
            autostart: false,
            since: 1,
            error: String::new(),
        }
    }

    #[test]
    fn only_changed_properties_are_announced() {
        let before = info();
        let mut after = info();
        after.state = MachineState::Running;
        after.leader = 42;
        after.since = 2;
        let changed = changed_properties(Some(&before), &after);
        let mut keys: Vec<_> = changed.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["Leader", "Since", "State"]);
        assert!(changed_properties(Some(&before), &info()).is_empty());
        assert_eq!(changed_properties(None, &info()).len(), 8);
    }
}
