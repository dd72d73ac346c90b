//! `rmachinectl`: the command-line client. It talks to rmachined only over
//! D-Bus, through the proxies in [`crate::dbus::proxy`].

mod copy;
mod create;
mod image;
mod lifecycle;
mod logs;
mod query;
mod remote;
mod shell;
mod table;
mod terminal;

use std::sync::OnceLock;

use clap::{Parser, Subcommand};
use zbus::Connection;

pub(crate) use remote::Host;

use crate::dbus::proxy::ManagerProxy;

/// Control rmachines machines through rmachined.
#[derive(Debug, Parser)]
#[command(name = "rmachinectl", version, after_long_help = REMOTE_HELP)]
pub struct Cli {
    /// Operate on rmachined on a remote host, over ssh (default: $RMACHINES_HOST).
    ///
    /// ssh runs systemd-stdio-bridge there; `shell` runs the remote host's
    /// rmachinectl through ssh. The ssh client is `ssh`, or the program
    /// RMACHINES_SSH names.
    #[arg(short = 'H', long = "host", value_name = "[USER@]HOST[:PORT]")]
    host: Option<Host>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every defined machine.
    List(query::ListOptions),
    /// Show one machine's state, definition and resource use (memory, CPU
    /// time, tasks, OOM kills, with the limits).
    Status(query::StatusOptions),
    /// Start machines (and wait until they are running).
    Start(lifecycle::StartOptions),
    /// Stop machines.
    Stop(lifecycle::StopOptions),
    /// Stop machines if they run, then start them.
    Restart(lifecycle::RestartOptions),
    /// Run a shell or a command inside a machine.
    Shell(shell::ShellOptions),
    /// Copy a file or a tree into or out of a running machine.
    Cp(copy::CopyOptions),
    /// Print a machine's console output.
    Logs(logs::LogsOptions),
    /// Make rmachined re-read the machine definitions; a running machine
    /// whose [resources] changed gets the new limits at once.
    Reload,
    /// Manage images: import, list, remove.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Define a machine made from an image (copies nothing).
    Create(create::CreateOptions),
    /// Delete stopped machines' definitions and writable layers.
    Remove(create::RemoveOptions),
}

/// The "Remote hosts" part of `--help` and rmachinectl(1).
const REMOTE_HELP: &str = "\
Remote hosts (-H):
  rmachinectl -H web1.example.org list
  rmachinectl -H ops@web2.example.org:2222 start web
  RMACHINES_HOST=web3.example.org rmachinectl status web --json
  rmachinectl -H web1.example.org shell web -- sh -c 'exit 3'

rmachinectl runs `ssh -x -T [-p PORT] [USER@]HOST` and, there, \
systemd-stdio-bridge to the system bus (DBUS_SYSTEM_BUS_ADDRESS when the \
remote login sets it), and speaks D-Bus over the pipe: rmachined and polkit \
see the remote user. `shell` runs the remote rmachinectl through ssh (ssh -tt \
for a terminal, ssh -T for pipes) and exits with the command's status. \
Errors name the host. RMACHINES_SSH names another ssh program or wrapper.";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot reach rmachined over ssh (ssh said why above, if it did): {0}")]
    Remote(#[source] zbus::Error),
    #[error("{}", bus_message(.0))]
    Bus(#[from] zbus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

/// A D-Bus error's sentence, or a hint when rmachined is not there.
fn bus_message(error: &zbus::Error) -> String {
    match error {
        zbus::Error::MethodError(name, detail, _) => match name.as_str() {
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                "rmachined is not running (org.rmachines1 is not on the system bus)".to_owned()
            }
            _ => detail.clone().unwrap_or_else(|| name.to_string()),
        },
        zbus::Error::FDO(fdo) => match fdo.as_ref() {
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                "rmachined is not running (org.rmachines1 is not on the system bus)".to_owned()
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Runs the command; returns the process exit status. Errors of commands
/// that act on several machines are printed as they happen and count as 1.
pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let host = match cli.host.clone() {
        Some(host) => Some(host),
        None => remote::host_from_environment().map_err(CliError::Failed)?,
    };
    let connection = match &host {
        None => Connection::system().await.map_err(CliError::Connect)?,
        Some(host) => {
            let _ = REMOTE_HOST.set(host.to_string());
            if matches!(cli.command, Command::Cp(_)) {
                return Err(CliError::Failed(
                    "cp copies between this host's files and a machine, so it does not take -H; \
                     over ssh, pipe a tar stream instead: \
                     `tar c DIR | rmachinectl -H HOST shell -T NAME -- tar x -C /dest`"
                        .into(),
                ));
            }
            if cli.command.passes_descriptors() {
                let verb_args = remote::verb_args(std::env::args_os());
                let terminal = remote::terminal_for(&verb_args);
                return remote::run_remote_cli(host, &verb_args, terminal).await;
            }
            remote::connect(host).await?
        }
    };
    // No property cache: it would cost two more round trips (AddMatch,
    // GetAll) before the first call, and the CLI reads properties rarely.
    let manager = ManagerProxy::builder(&connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    match cli.command {
        Command::List(options) => options.run(&manager).await.map(|()| 0),
        Command::Status(options) => options.run(&manager).await.map(|()| 0),
        Command::Start(options) => options.run(&manager).await,
        Command::Stop(options) => options.run(&manager).await,
        Command::Restart(options) => options.run(&manager).await,
        Command::Shell(options) => options.run(&manager).await,
        Command::Cp(options) => options.run(&manager).await,
        Command::Logs(options) => options.run(&manager).await,
        Command::Image(command) => command.run(&manager).await,
        Command::Create(options) => options.run(&manager).await,
        Command::Remove(options) => options.run(&manager).await,
        Command::Reload => {
            manager.reload().await?;
            Ok(0)
        }
    }
}

impl Command {
    /// Verbs that hand rmachined a descriptor (a pty, the caller's stdio):
    /// descriptors cannot cross ssh, so with `-H` the remote rmachinectl
    /// runs them.
    fn passes_descriptors(&self) -> bool {
        matches!(self, Command::Shell(_) | Command::Logs(_))
    }
}

/// The `-H` host, once known: every error line names it.
static REMOTE_HOST: OnceLock<String> = OnceLock::new();

/// Prints one error line the way every rmachinectl error looks.
pub fn report(error: &dyn std::fmt::Display) {
    match REMOTE_HOST.get() {
        Some(host) => eprintln!("rmachinectl: {host}: {error}"),
        None => eprintln!("rmachinectl: {error}"),
    }
}
