//! `create` and `remove`: machines made from an image, and their removal.

use clap::Args;

use super::{lifecycle, report, CliError};
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Args)]
#[command(
    after_help = "Writes <config-dir>/NAME.toml with `image = \"IMAGE\"`; nothing is copied:
the machine's root is an overlay of the image and its own writable layer in
<storage-dir>/machines/NAME (a tmpfs with --ephemeral). An OCI image without
/sbin/init gives a `boot = false` machine running its Entrypoint and Cmd with
its Env, WorkingDir and User.

Example:
  rmachinectl create web --image debian --start"
)]
pub(crate) struct CreateOptions {
    /// The new machine's name.
    name: String,
    /// The image its root is made from (an overlay: nothing is copied).
    #[arg(long)]
    image: String,
    /// Keep the machine's changes on a tmpfs, gone when it stops.
    #[arg(long)]
    ephemeral: bool,
    /// Start the machine when rmachined starts.
    #[arg(long)]
    autostart: bool,
    /// Start it now (and wait until it is running).
    #[arg(long)]
    start: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RemoveOptions {
    /// Stopped machines whose definition and writable layer go.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

impl CreateOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        manager
            .create_machine(&self.name, &self.image, self.ephemeral, self.autostart)
            .await?;
        if self.start {
            lifecycle::start(manager, &self.name, true).await?;
        }
        Ok(0)
    }
}

impl RemoveOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        let mut status = 0;
        for name in &self.names {
            if let Err(error) = manager.remove_machine(name).await {
                report(&CliError::from(error));
                status = 1;
            }
        }
        Ok(status)
    }
}
