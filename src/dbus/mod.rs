//! The `org.rmachines1` bus face of the daemon. Handlers parse, validate,
//! authorise, call the [`Manager`](crate::manager::Manager) and map its errors;
//! no container logic lives here.
//!
//! - [`manager`], `org.rmachines1.Manager` at `/org/rmachines1`.
//! - [`machine`], `org.rmachines1.Machine`, one object per definition.
//! - [`error`], the `org.rmachines1.*` errors.
//! - [`auth`], who is calling, and may they.
//! - [`proxy`], client proxies, shared by `rmachinectl` and the tests.
//! - [`events`], forwards manager events to signals and objects.

pub(crate) mod auth;
pub mod error;
mod events;
#[doc(hidden)]
pub mod introspection;
pub(crate) mod machine;
pub(crate) mod manager;
pub mod proxy;
pub(crate) mod validate;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::Connection;

use crate::manager::Manager;

/// The well-known name the daemon owns.
pub(crate) const BUS_NAME: &str = "org.rmachines1";
/// Where the Manager object (and the ObjectManager) lives.
pub const MANAGER_PATH: &str = "/org/rmachines1";
/// Machine objects live below this path, one label per machine.
pub const MACHINE_PATH_PREFIX: &str = "/org/rmachines1/machine";
/// polkit action for Start, Stop and Reload.
pub(crate) const ACTION_MANAGE: &str = "org.rmachines1.manage";
/// polkit action for Shell.
pub(crate) const ACTION_SHELL: &str = "org.rmachines1.shell";

/// Escapes `name` into one object path element the way `sd_bus_path_encode()`
/// does: ASCII letters are kept, digits too except in the first position,
/// every other byte becomes `_xx` (lowercase hex); the empty string is `_`.
pub(crate) fn escape_bus_label(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    let mut label = String::with_capacity(name.len() * 3);
    for (index, byte) in name.bytes().enumerate() {
        if byte.is_ascii_alphabetic() || (index > 0 && byte.is_ascii_digit()) {
            label.push(char::from(byte));
        } else {
            label.push('_');
            label.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            label.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
    }
    label
}

/// The object path of the machine called `name`. Any string gives a valid
/// path, but callers validate names first so that no path is built from
/// untrusted input.
pub fn machine_path(name: &str) -> OwnedObjectPath {
    let path = format!("{MACHINE_PATH_PREFIX}/{}", escape_bus_label(name));
    // The prefix is a valid path and the escaped label holds only [A-Za-z0-9_]
    // and is never empty, so the result is a valid object path.
    ObjectPath::from_string_unchecked(path).into()
}

/// Registers the Manager object, the ObjectManager and one Machine object per
/// known machine on `connection`, and starts forwarding the manager's events
/// as signals. Call this before requesting [`BUS_NAME`], so no call arrives
/// at a half-built service.
pub(crate) async fn serve(connection: &Connection, manager: Manager) -> zbus::Result<()> {
    // Subscribe before the snapshot below so that no change falls between.
    let events = manager.subscribe();
    let server = connection.object_server();
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    manager::ManagerObject::serve_at(connection, manager.clone()).await?;
    for info in manager.list() {
        machine::MachineObject::serve_at(connection, manager.clone(), &info.name).await?;
    }
    events::spawn_forwarder(connection.clone(), manager, events);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_sd_bus_path_encode() {
        assert_eq!(escape_bus_label(""), "_");
        assert_eq!(escape_bus_label("web"), "web");
        assert_eq!(escape_bus_label("web-1.lan"), "web_2d1_2elan");
        assert_eq!(escape_bus_label("1web"), "_31web");
        assert_eq!(escape_bus_label("a/b"), "a_2fb");
        assert_eq!(escape_bus_label("Web9"), "Web9");
    }

    #[test]
    fn machine_paths_are_below_the_prefix() {
        assert_eq!(
            machine_path("web-1").as_str(),
            "/org/rmachines1/machine/web_2d1"
        );
        assert_eq!(machine_path("").as_str(), "/org/rmachines1/machine/_");
    }
}
