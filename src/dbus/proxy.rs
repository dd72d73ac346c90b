//! Client proxies for `org.rmachines1`, declared once and shared by
//! `rmachinectl` and the tests.

use zbus::zvariant::{OwnedFd, OwnedObjectPath};

/// One entry of `List`: name, state, leader PID, object path.
pub type MachineEntry = (String, String, u32, OwnedObjectPath);

/// One entry of `ListImages`: name, format, bytes, import time (realtime
/// µs), the machines that use it.
pub type ImageEntry = (String, String, u64, u64, Vec<String>);

#[zbus::proxy(
    interface = "org.rmachines1.Manager",
    default_service = "org.rmachines1",
    default_path = "/org/rmachines1"
)]
pub trait Manager {
    fn list(&self) -> zbus::Result<Vec<MachineEntry>>;

    fn get_machine(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn start(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn stop(&self, name: &str) -> zbus::Result<()>;

    fn shell(
        &self,
        name: &str,
        user: &str,
        command: &[&str],
        environment: &[&str],
    ) -> zbus::Result<(OwnedFd, u32)>;

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        name: &str,
        user: &str,
        command: &[&str],
        environment: &[&str],
        stdin: zbus::zvariant::Fd<'_>,
        stdout: zbus::zvariant::Fd<'_>,
        stderr: zbus::zvariant::Fd<'_>,
    ) -> zbus::Result<u32>;

    fn open_console_log(&self, name: &str) -> zbus::Result<Vec<OwnedFd>>;

    fn reload(&self) -> zbus::Result<()>;

    fn import_image(
        &self,
        name: &str,
        source: zbus::zvariant::Fd<'_>,
        format: &str,
        reference: &str,
    ) -> zbus::Result<(String, u64, u64, u64)>;

    fn list_images(&self) -> zbus::Result<Vec<ImageEntry>>;

    fn remove_image(&self, name: &str) -> zbus::Result<()>;

    fn create_machine(
        &self,
        name: &str,
        image: &str,
        ephemeral: bool,
        autostart: bool,
    ) -> zbus::Result<OwnedObjectPath>;

    fn remove_machine(&self, name: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    fn import_progress(&self, name: String, done: u64, total: u64) -> zbus::Result<()>;

    #[zbus(signal)]
    fn state_changed(&self, name: String, state: String) -> zbus::Result<()>;

    #[zbus(signal)]
    fn shell_exited(&self, session: u32, status: i32) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.rmachines1.Machine",
    default_service = "org.rmachines1"
)]
pub trait Machine {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn leader(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn root(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn definition(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn addresses(&self) -> zbus::Result<Vec<String>>;

    #[zbus(property)]
    fn autostart(&self) -> zbus::Result<bool>;

    #[zbus(property)]
    fn since(&self) -> zbus::Result<u64>;

    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;

    #[zbus(property, name = "MemoryCurrent")]
    fn memory_current(&self) -> zbus::Result<u64>;

    #[zbus(property, name = "MemoryMax")]
    fn memory_max(&self) -> zbus::Result<u64>;

    #[zbus(property, name = "CPUUsageNSec")]
    fn cpu_usage_nsec(&self) -> zbus::Result<u64>;

    #[zbus(property, name = "TasksCurrent")]
    fn tasks_current(&self) -> zbus::Result<u64>;

    #[zbus(property, name = "TasksMax")]
    fn tasks_max(&self) -> zbus::Result<u64>;

    #[zbus(property, name = "OOMKills")]
    fn oom_kills(&self) -> zbus::Result<u64>;
}
