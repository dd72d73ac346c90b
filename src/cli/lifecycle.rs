//! `start`, `stop` and `restart`: each acts on several machines at once.

use clap::Args;
use futures_util::StreamExt;
use tokio::task::JoinSet;
use zbus::proxy::CacheProperties;

use super::{report, CliError};
use crate::dbus::proxy::{MachineProxy, ManagerProxy};

#[derive(Debug, Args)]
pub(crate) struct StartOptions {
    /// Machines to start.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
    /// Return once init is executing instead of waiting for `running`.
    #[arg(long)]
    no_block: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StopOptions {
    /// Machines to stop.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RestartOptions {
    /// Machines to restart.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

impl StartOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        let block = !self.no_block;
        for_each(&self.names, manager, move |manager, name| async move {
            start(&manager, &name, block).await
        })
        .await
    }
}

impl StopOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        for_each(&self.names, manager, |manager, name| async move {
            manager.stop(&name).await.map_err(CliError::from)
        })
        .await
    }
}

impl RestartOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        for_each(&self.names, manager, |manager, name| async move {
            match manager.stop(&name).await {
                Ok(()) => {}
                Err(zbus::Error::MethodError(error, _, _))
                    if error.as_str() == "org.rmachines1.NotRunning" => {}
                Err(error) => return Err(error.into()),
            }
            start(&manager, &name, true).await
        })
        .await
    }
}

/// Runs `action` for every name concurrently; prints each failure on its
/// own line and returns 1 if any failed.
async fn for_each<F, Fut>(
    names: &[String],
    manager: &ManagerProxy<'static>,
    action: F,
) -> Result<i32, CliError>
where
    F: Fn(ManagerProxy<'static>, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for name in names {
        tasks.spawn(action(manager.clone(), name.clone()));
    }
    let mut status = 0;
    while let Some(result) = tasks.join_next().await {
        let outcome = result.unwrap_or_else(|error| Err(CliError::Failed(error.to_string())));
        if let Err(error) = outcome {
            report(&error);
            status = 1;
        }
    }
    Ok(status)
}

/// Starts `name`; with `block`, waits until it is `running` and fails with
/// the machine's error if it ends up `failed` or `stopped` instead.
pub(crate) async fn start(
    manager: &ManagerProxy<'static>,
    name: &str,
    block: bool,
) -> Result<(), CliError> {
    // Subscribe before calling Start, or a quick machine's change is missed.
    let mut changes = if block {
        Some(
            manager
                .receive_state_changed_with_args(&[(0, name)])
                .await?,
        )
    } else {
        None
    };
    let path = manager.start(name).await?;
    let Some(changes) = changes.as_mut() else {
        return Ok(());
    };
    while let Some(signal) = changes.next().await {
        let args = signal.args()?;
        if args.name() != name {
            continue;
        }
        match args.state().as_str() {
            "running" => return Ok(()),
            state @ ("failed" | "stopped") => {
                let machine = MachineProxy::builder(manager.inner().connection())
                    .path(path.clone())?
                    .cache_properties(CacheProperties::No)
                    .build()
                    .await?;
                let error = machine.error().await.unwrap_or_default();
                let reason = if error.is_empty() {
                    "see the daemon's log".to_owned()
                } else {
                    error
                };
                return Err(CliError::Failed(format!(
                    "machine {name:?} is {state} instead of running: {reason}"
                )));
            }
            _ => {}
        }
    }
    Err(CliError::Failed(format!(
        "lost the bus before machine {name:?} was running"
    )))
}
