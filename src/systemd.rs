//! On a systemd host (SPEC "On a systemd host"): each machine runs in a
//! delegated transient scope `machine-NAME.scope` in `machine.slice`, made
//! through systemd's D-Bus API, and is registered with systemd-machined.
//!
//! Layout of a machine's scope (as systemd-nspawn does it):
//!
//! ```text
//! machine.slice/machine-NAME.scope/            delegated to rmachined
//!                                  supervisor/ the supervisor process
//!                                  payload/    the machine's cgroup: init and
//!                                              the guest, its cgroup namespace
//!                                              root, delegated to guest root
//! ```
//!
//! The scope itself holds no process, so controllers can be enabled for the
//! payload (cgroup2's no-internal-processes rule).
//!
//! **Where the calls happen.** Every D-Bus call is made by the daemon, on its
//! tokio runtime with async zbus, never by a supervisor: the supervisor is
//! single-threaded and synchronous and clones containers (a machine reboot
//! clones again), while zbus's blocking API runs a multi-threaded tokio
//! runtime whose threads live on. So the daemon starts the supervisor held
//! (blocked on a pipe before it reads its plan), puts the held process in a
//! new scope, moves it to the scope's `supervisor` cgroup, writes the plan
//! with the payload cgroup, and releases it; the supervisor then forks away
//! inside the scope. Registration with machined needs the leader, which only
//! the supervisor's status tells: the daemon registers when it sees a new
//! leader and unregisters when the machine stops (or re-registers after a
//! guest reboot). A daemon that re-adopts a machine checks its registration.
//!
//! **Stopping a scope is a graceful machine stop.** A scope has no main
//! process, so systemd signals every process in it; the guest's processes
//! must not get a SIGTERM from outside. The scope's `KillSignal` is SIGCONT,
//! which systemd sends along with any kill signal anyway and which no
//! process acts on by default; the supervisor takes a SIGCONT from PID 1 as
//! a stop request and runs the machine's stop signal and `stop_timeout`.
//! `TimeoutStopSec` is `stop_timeout` plus a margin for the clean-up, then
//! systemd's SIGKILL. The scope is ordered `After=rmachined.service`, so at
//! shutdown machines stop before the daemon and before what it is ordered
//! after (network, local file systems).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::Connection;

/// The slice machines run in, as systemd-nspawn's do.
pub const SLICE: &str = "machine.slice";
/// The service name machines are registered under in machined.
pub const SERVICE: &str = "rmachines";
/// The daemon's unit: scopes are ordered after it.
pub const DAEMON_UNIT: &str = "rmachined.service";
/// Child cgroups of a scope.
pub const SUPERVISOR_CGROUP: &str = "supervisor";
pub const PAYLOAD_CGROUP: &str = "payload";
/// Time beyond `stop_timeout` a supervisor gets to clean up before
/// systemd's SIGKILL.
pub const STOP_MARGIN: Duration = Duration::from_secs(15);
/// How long a D-Bus call or a scope job may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const SYSTEMD_MANAGER: &str = "org.freedesktop.systemd1.Manager";
const MACHINED: &str = "org.freedesktop.machine1";
const MACHINED_PATH: &str = "/org/freedesktop/machine1";
const MACHINED_MANAGER: &str = "org.freedesktop.machine1.Manager";

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{what}: {source}")]
    Bus {
        what: String,
        #[source]
        source: zbus::Error,
    },
    #[error("{what}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { what: String },
    #[error("the job starting {unit} ended with result {result:?}; see `journalctl -u {unit}`")]
    Job { unit: String, result: String },
}

impl SystemdError {
    /// The D-Bus error name, when systemd or machined refused the call.
    pub fn error_name(&self) -> Option<&str> {
        match self {
            SystemdError::Bus {
                source: zbus::Error::MethodError(name, _, _),
                ..
            } => Some(name.as_str()),
            _ => None,
        }
    }
}

/// Whether PID 1 is systemd, as `sd_booted()` decides it.
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// systemd's `unit_name_escape()`: ASCII letters, digits, `:`, `_` and `.`
/// (not leading) stay, `/` becomes `-`, everything else is `\xNN`.
pub fn unit_name_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, byte) in text.bytes().enumerate() {
        match byte {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.') => {
                out.push(b as char)
            }
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// `machine-NAME.scope`, with NAME escaped as systemd-nspawn does.
pub fn scope_name(machine: &str) -> String {
    format!("machine-{}.scope", unit_name_escape(machine))
}

/// The scope used when `machine-NAME.scope` is taken (e.g. by a
/// systemd-nspawn machine of the same name).
pub fn fallback_scope_name(machine: &str) -> String {
    format!("rmachines-{}.scope", unit_name_escape(machine))
}

/// The properties of a machine's scope, whose only process at creation is
/// the (held) supervisor `pid`.
pub fn scope_properties(
    machine: &str,
    pid: u32,
    stop_timeout: Duration,
) -> Vec<(&'static str, Value<'static>)> {
    let timeout = stop_timeout.saturating_add(STOP_MARGIN);
    vec![
        (
            "Description",
            Value::from(format!("rmachines machine {machine}")),
        ),
        ("Slice", Value::from(SLICE.to_owned())),
        ("PIDs", Value::from(vec![pid])),
        ("Delegate", Value::from(true)),
        ("CollectMode", Value::from("inactive-or-failed".to_owned())),
        ("After", Value::from(vec![DAEMON_UNIT.to_owned()])),
        ("KillMode", Value::from("control-group".to_owned())),
        ("KillSignal", Value::from(libc::SIGCONT)),
        ("SendSIGKILL", Value::from(true)),
        (
            "TimeoutStopUSec",
            Value::from(u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX)),
        ),
    ]
}

/// Whether a signal the supervisor received is its scope being stopped:
/// SIGCONT sent by PID 1 (see the module documentation).
pub fn is_scope_stop(signal: i32, sender: u32) -> bool {
    signal == libc::SIGCONT && sender == 1
}

/// The machine's cgroup (init, the guest) below its scope's cgroup.
pub fn payload_cgroup(scope_cgroup: &Path) -> PathBuf {
    scope_cgroup.join(PAYLOAD_CGROUP)
}

/// The supervisor's cgroup below its scope's cgroup.
pub fn supervisor_cgroup(scope_cgroup: &Path) -> PathBuf {
    scope_cgroup.join(SUPERVISOR_CGROUP)
}

/// Creates `cgroup` if needed and moves process `pid` into it.
pub fn move_into(cgroup: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(cgroup)?;
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
}

/// A machine's scope, once systemd started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub unit: String,
    /// The scope's cgroup directory in the cgroup2 hierarchy.
    pub cgroup: PathBuf,
}

/// What machined is told about a running machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    /// The machine id (`/etc/machine-id` of the guest).
    pub id: [u8; 16],
    pub leader: u32,
    pub root: String,
    /// Host-side interface index of the machine's veth.
    pub ifindex: Option<i32>,
}

/// 32 hex digits to the 16 bytes machined takes; `None` if malformed.
pub fn machine_id_bytes(hex: &str) -> Option<[u8; 16]> {
    let hex = hex.trim();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// How a registration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Yes,
    /// machined already knows this machine with this leader (a re-adopted
    /// machine registered by an earlier daemon).
    Already,
    /// Another machine of that name is registered (an nspawn machine, or a
    /// stale entry): a warning, never a failed start.
    Clash(String),
    /// No machined on the bus.
    NoMachined,
}

/// The systemd host: systemd's and machined's bus faces.
#[derive(Clone)]
pub struct Host {
    connection: Connection,
}

impl Host {
    /// The host's systemd, when PID 1 is systemd and answers on this bus;
    /// `None` otherwise (then rmachined manages its own cgroups). A daemon
    /// on a private bus (the test harness) on a systemd host gets `None`.
    pub async fn detect(connection: &Connection) -> Option<Host> {
        if !booted() {
            return None;
        }
        let name = zbus::names::BusName::from_static_str(SYSTEMD).ok()?;
        let owned = match zbus::fdo::DBusProxy::new(connection).await {
            Ok(bus) => bus.name_has_owner(name).await.unwrap_or(false),
            Err(_) => false,
        };
        if !owned {
            tracing::warn!(
                "systemd is PID 1 but {SYSTEMD} is not on this bus; machines run in rmachined's own cgroups"
            );
            return None;
        }
        Some(Host {
            connection: connection.clone(),
        })
    }

    async fn proxy(
        &self,
        destination: &'static str,
        path: &'static str,
        interface: &'static str,
    ) -> Result<zbus::Proxy<'static>, SystemdError> {
        zbus::Proxy::new(&self.connection, destination, path, interface)
            .await
            .map_err(|source| SystemdError::Bus {
                what: format!("connecting to {destination}"),
                source,
            })
    }

    /// Starts the machine's scope around `pid` and waits for its job; uses
    /// [`fallback_scope_name`] when `machine-NAME.scope` exists already.
    pub async fn start_scope(
        &self,
        machine: &str,
        pid: u32,
        stop_timeout: Duration,
    ) -> Result<Scope, SystemdError> {
        let preferred = scope_name(machine);
        match self
            .start_scope_named(&preferred, machine, pid, stop_timeout)
            .await
        {
            Err(err) if err.error_name() == Some("org.freedesktop.systemd1.UnitExists") => {
                let fallback = fallback_scope_name(machine);
                tracing::warn!(
                    machine,
                    "{preferred} exists already (another machine of that name?); using {fallback}"
                );
                self.start_scope_named(&fallback, machine, pid, stop_timeout)
                    .await
            }
            other => other,
        }
    }

    async fn start_scope_named(
        &self,
        unit: &str,
        machine: &str,
        pid: u32,
        stop_timeout: Duration,
    ) -> Result<Scope, SystemdError> {
        let manager = self.proxy(SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER).await?;
        let bus = |what: String| move |source| SystemdError::Bus { what, source };
        // Listen before asking, so a job that ends at once is not missed.
        let mut removed = manager
            .receive_signal("JobRemoved")
            .await
            .map_err(bus(format!("watching the job of {unit}")))?;
        let properties = scope_properties(machine, pid, stop_timeout);
        let auxiliary: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        let body = (unit, "fail", properties, auxiliary);
        let call = manager.call::<_, _, OwnedObjectPath>("StartTransientUnit", &body);
        let job = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| SystemdError::Timeout {
                what: format!("creating {unit}"),
            })?
            .map_err(bus(format!("creating {unit}")))?;
        let wait = async {
            while let Some(message) = removed.next().await {
                let Ok((_, path, _, result)) = message
                    .body()
                    .deserialize::<(u32, OwnedObjectPath, String, String)>()
                else {
                    continue;
                };
                if path == job {
                    return Some(result);
                }
            }
            None
        };
        let result = tokio::time::timeout(CALL_TIMEOUT, wait)
            .await
            .map_err(|_| SystemdError::Timeout {
                what: format!("waiting for the job starting {unit}"),
            })?
            .unwrap_or_else(|| "unknown (the bus connection closed)".to_owned());
        if result != "done" {
            return Err(SystemdError::Job {
                unit: unit.to_owned(),
                result,
            });
        }
        let cgroup = self.unit_cgroup(unit).await?;
        Ok(Scope {
            unit: unit.to_owned(),
            cgroup,
        })
    }

    /// The cgroup directory of a loaded unit.
    async fn unit_cgroup(&self, unit: &str) -> Result<PathBuf, SystemdError> {
        let manager = self.proxy(SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER).await?;
        let bus = |what: String| move |source| SystemdError::Bus { what, source };
        let path: OwnedObjectPath = manager
            .call("GetUnit", &(unit,))
            .await
            .map_err(bus(format!("finding {unit}")))?;
        let properties = zbus::fdo::PropertiesProxy::builder(&self.connection)
            .destination(SYSTEMD)
            .and_then(|b| b.path(path))
            .map_err(bus(format!("reading {unit}")))?
            .build()
            .await
            .map_err(bus(format!("reading {unit}")))?;
        let interface =
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Scope");
        let value = properties
            .get(interface, "ControlGroup")
            .await
            .map_err(|e| SystemdError::Bus {
                what: format!("reading the ControlGroup of {unit}"),
                source: e.into(),
            })?;
        let relative = String::try_from(value).map_err(|e| SystemdError::Bus {
            what: format!("reading the ControlGroup of {unit}"),
            source: e.into(),
        })?;
        let mount = crate::runtime::cgroup::cgroup2_mount().map_err(|e| SystemdError::Bus {
            what: format!("placing the cgroup of {unit}"),
            source: zbus::Error::Failure(e.to_string()),
        })?;
        Ok(mount.join(relative.trim_start_matches('/')))
    }

    /// Registers a running machine with machined (class container,
    /// service `rmachines`).
    pub async fn register(&self, machine: &Registration) -> Result<Registered, SystemdError> {
        let manager = self
            .proxy(MACHINED, MACHINED_PATH, MACHINED_MANAGER)
            .await?;
        let ifindices: Vec<i32> = machine.ifindex.into_iter().collect();
        let body = (
            machine.name.as_str(),
            machine.id.to_vec(),
            SERVICE,
            "container",
            machine.leader,
            machine.root.as_str(),
            ifindices,
        );
        let call = manager.call::<_, _, OwnedObjectPath>("RegisterMachineWithNetwork", &body);
        let result = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| SystemdError::Timeout {
                what: format!("registering {} with machined", machine.name),
            })?;
        let error = match result {
            Ok(_) => return Ok(Registered::Yes),
            Err(error) => SystemdError::Bus {
                what: format!("registering {} with machined", machine.name),
                source: error,
            },
        };
        match error.error_name() {
            Some("org.freedesktop.DBus.Error.ServiceUnknown")
            | Some("org.freedesktop.DBus.Error.NameHasNoOwner")
            | Some("org.freedesktop.systemd1.NoSuchUnit") => Ok(Registered::NoMachined),
            Some("org.freedesktop.machine1.MachineExists") => {
                match self.registered_leader(&machine.name).await {
                    Ok(leader) if leader == machine.leader => Ok(Registered::Already),
                    Ok(leader) => Ok(Registered::Clash(format!(
                        "machined already has a machine {:?} (leader {leader})",
                        machine.name
                    ))),
                    Err(err) => Ok(Registered::Clash(err.to_string())),
                }
            }
            _ => Err(error),
        }
    }

    /// The leader of the machine machined knows as `name`.
    async fn registered_leader(&self, name: &str) -> Result<u32, SystemdError> {
        let manager = self
            .proxy(MACHINED, MACHINED_PATH, MACHINED_MANAGER)
            .await?;
        let bus = |what: String| move |source| SystemdError::Bus { what, source };
        let path: OwnedObjectPath = manager
            .call("GetMachine", &(name,))
            .await
            .map_err(bus(format!("looking up machine {name} in machined")))?;
        let machine = zbus::Proxy::new(
            &self.connection,
            MACHINED,
            path,
            "org.freedesktop.machine1.Machine",
        )
        .await
        .map_err(bus(format!("looking up machine {name} in machined")))?;
        machine
            .get_property::<u32>("Leader")
            .await
            .map_err(bus(format!("reading the leader of {name} in machined")))
    }

    /// Drops machined's record of `name` (the machine's processes are not
    /// touched). Missing machined or record: nothing to do.
    pub async fn unregister(&self, name: &str) -> Result<(), SystemdError> {
        let manager = self
            .proxy(MACHINED, MACHINED_PATH, MACHINED_MANAGER)
            .await?;
        let body = (name,);
        let call = manager.call::<_, _, ()>("UnregisterMachine", &body);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Err(_) => Err(SystemdError::Timeout {
                what: format!("unregistering {name} from machined"),
            }),
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                let error = SystemdError::Bus {
                    what: format!("unregistering {name} from machined"),
                    source,
                };
                match error.error_name() {
                    Some("org.freedesktop.machine1.NoSuchMachine")
                    | Some("org.freedesktop.DBus.Error.ServiceUnknown")
                    | Some("org.freedesktop.DBus.Error.NameHasNoOwner") => Ok(()),
                    _ => Err(error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_escape_like_systemd() {
        assert_eq!(scope_name("web"), "machine-web.scope");
        assert_eq!(scope_name("my-box"), "machine-my\\x2dbox.scope");
        assert_eq!(scope_name("db.1"), "machine-db.1.scope");
        assert_eq!(unit_name_escape(".x/y z"), "\\x2ex-y\\x20z");
        assert_eq!(fallback_scope_name("my-box"), "rmachines-my\\x2dbox.scope");
    }

    #[test]
    fn scope_is_delegated_in_machine_slice_and_stops_through_the_supervisor() {
        let props = scope_properties("web", 4242, Duration::from_secs(30));
        let get = |key: &str| {
            props
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no property {key}"))
        };
        assert_eq!(get("PIDs"), Value::from(vec![4242u32]));
        assert_eq!(get("Delegate"), Value::from(true));
        assert_eq!(get("Slice"), Value::from("machine.slice"));
        assert_eq!(get("Description"), Value::from("rmachines machine web"));
        assert_eq!(
            get("After"),
            Value::from(vec!["rmachined.service".to_owned()])
        );
        // The guest's processes get only the SIGCONT systemd always sends;
        // the supervisor takes it from PID 1 as the stop request.
        assert_eq!(get("KillSignal"), Value::from(libc::SIGCONT));
        assert_eq!(get("KillMode"), Value::from("control-group"));
        assert_eq!(get("SendSIGKILL"), Value::from(true));
        // Stop timeout plus the margin before systemd's SIGKILL.
        assert_eq!(get("TimeoutStopUSec"), Value::from(45_000_000u64));
        // Every name is a property systemd accepts for a transient scope;
        // the signature of each is what systemd expects.
        let signatures: Vec<(&str, String)> = props
            .iter()
            .map(|(k, v)| (*k, v.value_signature().to_string()))
            .collect();
        assert_eq!(
            signatures,
            [
                ("Description", "s"),
                ("Slice", "s"),
                ("PIDs", "au"),
                ("Delegate", "b"),
                ("CollectMode", "s"),
                ("After", "as"),
                ("KillMode", "s"),
                ("KillSignal", "i"),
                ("SendSIGKILL", "b"),
                ("TimeoutStopUSec", "t"),
            ]
            .map(|(k, s)| (k, s.to_owned()))
        );
    }

    #[test]
    fn only_sigcont_from_pid1_is_a_scope_stop() {
        assert!(is_scope_stop(libc::SIGCONT, 1));
        assert!(!is_scope_stop(libc::SIGCONT, 1234));
        assert!(!is_scope_stop(libc::SIGTERM, 1));
    }

    #[test]
    fn payload_and_supervisor_live_below_the_scope() {
        let scope = Path::new("/sys/fs/cgroup/machine.slice/machine-web.scope");
        assert_eq!(
            payload_cgroup(scope),
            Path::new("/sys/fs/cgroup/machine.slice/machine-web.scope/payload")
        );
        assert_eq!(
            supervisor_cgroup(scope),
            Path::new("/sys/fs/cgroup/machine.slice/machine-web.scope/supervisor")
        );
    }

    #[test]
    fn machine_ids_become_16_bytes() {
        let id = machine_id_bytes("0123456789abcdef0123456789ABCDEF\n").unwrap();
        assert_eq!(id[0], 0x01);
        assert_eq!(id[15], 0xef);
        assert_eq!(machine_id_bytes("0123"), None);
        assert_eq!(machine_id_bytes("zz23456789abcdef0123456789abcdef"), None);
    }
}
