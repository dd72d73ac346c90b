//! rmachined's orchestration: logging, the bus, readiness and watchdog
//! notifications to systemd, and an orderly exit on SIGTERM/SIGINT.
//! The binary only parses flags and calls [`run_with`].
//!
//! The daemon's exit does not stop machines (SPEC "Daemon lifetime and
//! machines"): each machine has its own supervisor (and, on a systemd host,
//! its own scope unit), and the next daemon re-adopts it. Machines stop when
//! asked (`rmachinectl stop`), when the host shuts down (their scopes, or
//! SIGTERM to their supervisors), or — with `--stop-machines-on-exit` — when
//! this daemon exits.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast::error::RecvError;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::Connection;

use crate::dbus;
use crate::manager::{Event, Manager, ManagerConfig, ManagerError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot load the machines: {0}")]
    Manager(#[source] ManagerError),
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot serve the D-Bus objects: {0}")]
    Serve(#[source] zbus::Error),
    #[error("cannot own {name} on the bus: {source}")]
    RequestName {
        name: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("{0} is already owned by another process; is rmachined running already?")]
    NameTaken(&'static str),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Sends logs to the journal when `JOURNAL_STREAM` says stderr is connected
/// to it, else to stderr. The level comes from `RUST_LOG` (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = if stderr_is_journal() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    match journal {
        Some(journal) => tracing_subscriber::registry()
            .with(filter)
            .with(journal)
            .init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// `JOURNAL_STREAM` holds `dev:ino` of the journal stream systemd connected
/// to stdout/stderr; it only counts if stderr is still that stream.
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        #[allow(clippy::unnecessary_cast)] // the field types differ between targets
        Ok(stat) => stat.st_dev as u64 == dev && stat.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// What the daemon does besides serving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Stop every machine (in parallel) on SIGTERM/SIGINT before exiting,
    /// and remove the bridge and rules. Off by default: a restart keeps the
    /// machines running.
    pub stop_machines_on_exit: bool,
}

/// Runs the daemon until SIGTERM or SIGINT; then it exits, leaving the
/// machines to their supervisors unless `options` say to stop them.
pub async fn run_with(config: ManagerConfig, options: RunOptions) -> Result<(), DaemonError> {
    // Install the handlers first so an early SIGTERM is not fatal.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let manager = Manager::new(config).await.map_err(DaemonError::Manager)?;
    let connection = zbus::connection::Builder::system()
        .map_err(DaemonError::Connect)?
        .build()
        .await
        .map_err(DaemonError::Connect)?;
    // Before any start (autostart, a call): on a systemd host machines run
    // in scopes and are registered with machined.
    match crate::systemd::Host::detect(&connection).await {
        Some(host) => {
            tracing::info!(
                "systemd is PID 1: machines run in scopes in {} and are registered with systemd-machined",
                crate::systemd::SLICE
            );
            manager.use_systemd(host).await;
        }
        None => tracing::debug!("systemd is not PID 1: machines run in rmachined's own cgroups"),
    }
    dbus::serve(&connection, manager.clone())
        .await
        .map_err(DaemonError::Serve)?;
    request_name(&connection).await?;
    tracing::info!("serving {} on the system bus", dbus::BUS_NAME);

    // Subscribe before autostart so the status line sees every change.
    let status_events = manager.subscribe();
    manager.autostart();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(manager.running_count())),
    ]);
    tokio::spawn(update_status(manager.clone(), status_events));
    spawn_watchdog();

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    if options.stop_machines_on_exit {
        tracing::info!("{signal} received; stopping every machine (--stop-machines-on-exit)");
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping machines"),
        ]);
        manager.shutdown().await;
    } else {
        let running = manager.active_count();
        tracing::info!(
            "{signal} received; exiting, {} keep running (the next rmachined re-adopts them)",
            machines_phrase(running)
        );
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("exiting; machines keep running"),
        ]);
    }
    if let Err(error) = connection.release_name(dbus::BUS_NAME).await {
        tracing::debug!("cannot release {}: {error}", dbus::BUS_NAME);
    }
    tracing::info!("exiting");
    Ok(())
}

fn machines_phrase(count: usize) -> String {
    match count {
        1 => "1 machine".to_owned(),
        n => format!("{n} machines"),
    }
}

async fn request_name(connection: &Connection) -> Result<(), DaemonError> {
    let reply = connection
        .request_name_with_flags(dbus::BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
        .map_err(|source| match source {
            zbus::Error::NameTaken => DaemonError::NameTaken(dbus::BUS_NAME),
            source => DaemonError::RequestName {
                name: dbus::BUS_NAME,
                source,
            },
        })?;
    match reply {
        RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner => Ok(()),
        RequestNameReply::InQueue | RequestNameReply::Exists => {
            Err(DaemonError::NameTaken(dbus::BUS_NAME))
        }
    }
}

fn status_line(running: usize) -> String {
    match running {
        1 => "1 machine running".to_owned(),
        n => format!("{n} machines running"),
    }
}

async fn update_status(manager: Manager, mut events: tokio::sync::broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::StateChanged { .. }) | Err(RecvError::Lagged(_)) => {
                let line = status_line(manager.running_count());
                notify(&[sd_notify::NotifyState::Status(&line)]);
            }
            Ok(_) => {}
            Err(RecvError::Closed) => break,
        }
    }
}

/// Pings the watchdog at half the interval systemd asked for, if it asked.
fn spawn_watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tracing::debug!(?period, "watchdog enabled");
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}

/// Sends `states` to `$NOTIFY_SOCKET` without ever blocking: a manager that
/// does not read its socket (a full queue) costs a lost STATUS line, never a
/// stuck daemon, which a blocking `sd_notify` would give inside tokio.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|state| format!("{state}\n")).collect();
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(abstract_name) => UnixAddr::new_abstract(abstract_name.as_bytes()),
        None => UnixAddr::new(path.as_str()),
    };
    let result = address.and_then(|address| {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        sendto(
            sock.as_raw_fd(),
            message.as_bytes(),
            &address,
            MsgFlags::MSG_DONTWAIT,
        )
    });
    match result {
        Ok(_) => {}
        // The manager is not reading (a full queue): lose this line quietly.
        Err(nix::errno::Errno::EAGAIN) => {
            tracing::debug!("the service manager at {path} is not reading; dropped {message:?}")
        }
        Err(error) => tracing::warn!("cannot notify the service manager at {path}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_line(0), "0 machines running");
        assert_eq!(status_line(1), "1 machine running");
        assert_eq!(status_line(3), "3 machines running");
    }

    #[test]
    fn machines_keep_running_unless_the_flag_says_otherwise() {
        use clap::Parser;
        let plain = Args::try_parse_from(["rmachined"]).unwrap();
        assert!(!plain.run_options().stop_machines_on_exit);
        let flagged = Args::try_parse_from(["rmachined", "--stop-machines-on-exit"]).unwrap();
        assert!(flagged.run_options().stop_machines_on_exit);
    }
}

/// The rmachines system service: boots and supervises machines and serves
/// org.rmachines1 on the system bus.
///
/// Each machine has a supervisor process of its own, which outlives the
/// daemon. On SIGTERM or SIGINT rmachined exits at once and leaves every
/// machine running; the next rmachined re-adopts them (same init, same
/// addresses). So `systemctl restart rmachined`, a package upgrade and a
/// crash never stop a machine, and `systemctl stop rmachined` stops only the
/// daemon: its machines keep running, without D-Bus API or autostart, until
/// it starts again. To stop machines, use `rmachinectl stop NAME` (or
/// `systemctl stop rmachine@NAME` / `machine-NAME.scope`) first, or run
/// the daemon with --stop-machines-on-exit.
///
/// When systemd is PID 1, each machine runs in its own delegated scope
/// unit machine-NAME.scope in machine.slice and is registered with
/// systemd-machined (class container, service rmachines), so `machinectl
/// list` and `systemctl status machine-NAME.scope` show it. Stopping the
/// scope stops the machine gracefully (its stop signal, then its
/// stop_timeout); the host's shutdown stops every machine so, before
/// rmachined. Without systemd (or machined), machines run in rmachined's
/// own cgroups; a supervisor that gets SIGTERM (sysvinit's killall5 at
/// shutdown) stops its machine gracefully.
#[derive(Debug, clap::Parser)]
#[command(name = "rmachined", version)]
pub struct Args {
    /// Directory of machine definitions (*.toml).
    #[arg(long, default_value = "/etc/rmachines")]
    pub config_dir: PathBuf,
    /// Directory for runtime state.
    #[arg(long, default_value = "/run/rmachines")]
    pub state_dir: PathBuf,
    /// Directory for persistent storage.
    #[arg(long, default_value = "/var/lib/rmachines")]
    pub storage_dir: PathBuf,
    /// The bridge rmachined creates for machines with private networking.
    #[arg(long, default_value = "rm-br0")]
    pub bridge: String,
    /// The machines' IPv4 subnet; the host holds its first address.
    #[arg(long, default_value = "10.213.0.0/16")]
    pub ipv4_subnet: crate::network::Ipv4Cidr,
    /// The machines' IPv6 subnet (ULA), or "none".
    #[arg(long, default_value = "fd6d:6163:6869:6e65::/64")]
    pub ipv6_subnet: String,
    /// The nftables tables (families inet and bridge) that hold all of rmachined's rules.
    #[arg(long, default_value = "rmachines")]
    pub nft_table: String,
    /// On SIGTERM/SIGINT, stop every machine before exiting. Without it the
    /// machines keep running and the next rmachined re-adopts them.
    #[arg(long)]
    pub stop_machines_on_exit: bool,
}

impl Args {
    /// What to do besides serving, from the flags.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            stop_machines_on_exit: self.stop_machines_on_exit,
        }
    }

    /// The manager's configuration from the flags.
    pub fn manager_config(self) -> Result<ManagerConfig, String> {
        let ipv6_subnet = match self.ipv6_subnet.as_str() {
            "none" => None,
            text => Some(
                text.parse()
                    .map_err(|err| format!("--ipv6-subnet {text:?}: {err}"))?,
            ),
        };
        Ok(ManagerConfig {
            network: crate::network::NetworkConfig {
                bridge: self.bridge,
                ipv4_subnet: self.ipv4_subnet,
                ipv6_subnet,
                table: self.nft_table,
                runtime_dir: self.state_dir.join("network"),
            },
            config_dir: self.config_dir,
            state_dir: self.state_dir,
            storage_dir: self.storage_dir,
        })
    }
}
