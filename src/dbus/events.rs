//! Forwards the manager's events to the bus: `StateChanged` and `ShellExited`
//! signals, `PropertiesChanged` on Machine objects, and Machine objects added
//! and removed as definitions come and go.

use std::borrow::Cow;
use std::collections::HashMap;

use tokio::sync::broadcast::{self, error::RecvError};
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::Value;
use zbus::Connection;

use super::machine::{MachineObject, INTERFACE as MACHINE_INTERFACE};
use super::manager::ManagerObject;
use super::{machine_path, MANAGER_PATH};
use crate::manager::{Event, MachineInfo, MachineState, Manager};

pub(super) fn spawn_forwarder(
    connection: Connection,
    manager: Manager,
    events: broadcast::Receiver<Event>,
) {
    let mut forwarder = Forwarder {
        connection,
        known: manager
            .list()
            .into_iter()
            .map(|info| (info.name.clone(), info))
            .collect(),
        manager,
    };
    tokio::spawn(async move { forwarder.run(events).await });
}

struct Forwarder {
    connection: Connection,
    manager: Manager,
    /// The last snapshot announced per machine, to tell what changed.
    known: HashMap<String, MachineInfo>,
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
            Event::StateChanged { name, state } => {
                self.announce_properties(&name, Some(state)).await?;
                let emitter = SignalEmitter::new(&self.connection, MANAGER_PATH)?;
                ManagerObject::state_changed(&emitter, &name, state.as_str()).await
            }
            Event::InfoChanged { name } => self.announce_properties(&name, None).await,
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
        match self.manager.get(name) {
            Ok(info) => {
                self.known.insert(name.to_owned(), info);
                MachineObject::serve_at(&self.connection, self.manager.clone(), name).await?;
            }
            Err(error) => tracing::warn!(name, "added machine is gone already: {error}"),
        }
        Ok(())
    }

    async fn remove(&mut self, name: &str) -> zbus::Result<()> {
        self.known.remove(name);
        MachineObject::remove(&self.connection, name).await?;
        Ok(())
    }

    /// Emits `PropertiesChanged` with every property of `name` that differs
    /// from the last announcement. `state` overrides the snapshot's state so
    /// that listeners see each transition even when the core has moved on.
    async fn announce_properties(
        &mut self,
        name: &str,
        state: Option<MachineState>,
    ) -> zbus::Result<()> {
        let Ok(mut current) = self.manager.get(name) else {
            return Ok(());
        };
        if let Some(state) = state {
            current.state = state;
        }
        let changed = changed_properties(self.known.get(name), &current);
        let path = machine_path(name);
        self.known.insert(name.to_owned(), current.clone());
        if changed.is_empty() {
            return Ok(());
        }
        let emitter = SignalEmitter::new(&self.connection, path)?;
        zbus::fdo::Properties::properties_changed(
            &emitter,
            InterfaceName::from_static_str_unchecked(MACHINE_INTERFACE),
            changed,
            Cow::Borrowed(&[]),
        )
        .await
    }

    /// After missing events: bring the objects in line with the manager's
    /// list and announce every property that changed meanwhile.
    async fn resync(&mut self) -> zbus::Result<()> {
        let now: HashMap<String, MachineInfo> = self
            .manager
            .list()
            .into_iter()
            .map(|info| (info.name.clone(), info))
            .collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name).await?;
        }
        for (name, info) in &now {
            if !self.known.contains_key(name) {
                self.add(name).await?;
            } else {
                let state = info.state;
                self.announce_properties(name, Some(state)).await?;
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
