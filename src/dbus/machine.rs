//! `org.rmachines1.Machine`, one object per defined machine at
//! `/org/rmachines1/machine/<escaped name>`. Properties are read from the
//! manager on every access; [`super::events`] emits `PropertiesChanged`,
//! except for the accounting ones (`MemoryCurrent`, `MemoryMax`,
//! `CPUUsageNSec`, `TasksCurrent`, `TasksMax`, `OOMKills`): they are read
//! from the machine's cgroups on every `Get` and never announced (they
//! change all the time).

use zbus::{fdo, interface, Connection};

use super::machine_path;
use crate::manager::{MachineInfo, Manager};

/// The D-Bus interface name, for `PropertiesChanged`.
pub(crate) const INTERFACE: &str = "org.rmachines1.Machine";

pub(crate) struct MachineObject {
    manager: Manager,
    name: String,
}

impl MachineObject {
    pub(crate) fn new(manager: Manager, name: &str) -> Self {
        MachineObject {
            manager,
            name: name.to_owned(),
        }
    }

    /// Serves the object of machine `name` (already validated: it came from
    /// the manager). Returns false if it was already served.
    pub(crate) async fn serve_at(
        connection: &Connection,
        manager: Manager,
        name: &str,
    ) -> zbus::Result<bool> {
        let object = MachineObject::new(manager, name);
        connection
            .object_server()
            .at(machine_path(name), object)
            .await
    }

    pub(crate) async fn remove(connection: &Connection, name: &str) -> zbus::Result<bool> {
        connection
            .object_server()
            .remove::<MachineObject, _>(machine_path(name))
            .await
    }

    fn info(&self) -> fdo::Result<MachineInfo> {
        self.manager
            .get(&self.name)
            .map_err(|error| fdo::Error::UnknownObject(error.to_string()))
    }
}

#[interface(name = "org.rmachines1.Machine")]
impl MachineObject {
    #[zbus(property)]
    fn name(&self) -> &str {
        &self.name
    }

    #[zbus(property)]
    fn state(&self) -> fdo::Result<String> {
        Ok(self.info()?.state.as_str().to_owned())
    }

    /// Host PID of the machine's init; 0 when not running.
    #[zbus(property)]
    fn leader(&self) -> fdo::Result<u32> {
        Ok(self.info()?.leader)
    }

    #[zbus(property)]
    fn root(&self) -> fdo::Result<String> {
        Ok(self.info()?.root)
    }

    /// Path of the definition file.
    #[zbus(property)]
    fn definition(&self) -> fdo::Result<String> {
        Ok(self.info()?.definition)
    }

    #[zbus(property)]
    fn addresses(&self) -> fdo::Result<Vec<String>> {
        Ok(self.info()?.addresses)
    }

    #[zbus(property)]
    fn autostart(&self) -> fdo::Result<bool> {
        Ok(self.info()?.autostart)
    }

    /// Realtime microseconds of the last state change.
    #[zbus(property)]
    fn since(&self) -> fdo::Result<u64> {
        Ok(self.info()?.since)
    }

    /// Why the definition is invalid or the last start failed; empty if none.
    #[zbus(property)]
    fn error(&self) -> fdo::Result<String> {
        Ok(self.info()?.error)
    }

    /// Bytes the machine uses now; `u64::MAX` when unknown.
    #[zbus(property(emits_changed_signal = "false"), name = "MemoryCurrent")]
    fn memory_current(&self) -> u64 {
        self.manager.usage(&self.name).memory_current
    }

    /// The machine's hard memory limit; `u64::MAX` for none or unknown.
    #[zbus(property(emits_changed_signal = "false"), name = "MemoryMax")]
    fn memory_max(&self) -> u64 {
        self.manager.usage(&self.name).memory_max
    }

    /// CPU time the machine used since it started, nanoseconds.
    #[zbus(property(emits_changed_signal = "false"), name = "CPUUsageNSec")]
    fn cpu_usage_nsec(&self) -> u64 {
        self.manager.usage(&self.name).cpu_usage_nsec
    }

    /// Tasks (processes and threads) in the machine now.
    #[zbus(property(emits_changed_signal = "false"), name = "TasksCurrent")]
    fn tasks_current(&self) -> u64 {
        self.manager.usage(&self.name).tasks_current
    }

    /// The machine's task limit; `u64::MAX` for none or unknown.
    #[zbus(property(emits_changed_signal = "false"), name = "TasksMax")]
    fn tasks_max(&self) -> u64 {
        self.manager.usage(&self.name).tasks_max
    }

    /// Processes the kernel's OOM killer killed in the machine since it
    /// started (its memory limit was reached).
    #[zbus(property(emits_changed_signal = "false"), name = "OOMKills")]
    fn oom_kills(&self) -> u64 {
        self.manager.usage(&self.name).oom_kills
    }
}
