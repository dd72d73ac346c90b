//! `rmachinectl`: the command-line client. It talks to rmachined only over
//! D-Bus, through the proxies in [`crate::dbus::proxy`].

mod create;
mod image;
mod lifecycle;
mod query;
mod shell;
mod table;
mod terminal;

use clap::{Parser, Subcommand};
use zbus::Connection;

use crate::dbus::proxy::ManagerProxy;

/// Control rmachines machines through rmachined.
#[derive(Debug, Parser)]
#[command(name = "rmachinectl", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every defined machine.
    List(query::ListOptions),
    /// Show one machine's state and definition.
    Status(query::StatusOptions),
    /// Start machines (and wait until they are running).
    Start(lifecycle::StartOptions),
    /// Stop machines.
    Stop(lifecycle::StopOptions),
    /// Stop machines if they run, then start them.
    Restart(lifecycle::RestartOptions),
    /// Run a shell or a command inside a machine.
    Shell(shell::ShellOptions),
    /// Make rmachined re-read the machine definitions.
    Reload,
    /// Manage images: import, list, remove.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Define a machine made from an image (copies nothing).
    Create(create::CreateOptions),
    /// Delete stopped machines' definitions and writable layers.
    Remove(create::RemoveOptions),
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
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
    let connection = Connection::system().await.map_err(CliError::Connect)?;
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
        Command::Image(command) => command.run(&manager).await,
        Command::Create(options) => options.run(&manager).await,
        Command::Remove(options) => options.run(&manager).await,
        Command::Reload => {
            manager.reload().await?;
            Ok(0)
        }
    }
}

/// Prints one error line the way every rmachinectl error looks.
pub fn report(error: &dyn std::fmt::Display) {
    eprintln!("rmachinectl: {error}");
}
