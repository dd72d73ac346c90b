//! `org.rmachines1.Manager` at `/org/rmachines1`.

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{self, OwnedObjectPath};
use zbus::{interface, Connection};

use super::error::Error;
use super::{auth, machine_path, validate, ACTION_MANAGE, ACTION_SHELL, MANAGER_PATH};
use crate::manager::Manager;

/// The Manager object; holds only a handle to the core.
pub(crate) struct ManagerObject {
    manager: Manager,
}

impl ManagerObject {
    pub(crate) async fn serve_at(connection: &Connection, manager: Manager) -> zbus::Result<bool> {
        connection
            .object_server()
            .at(MANAGER_PATH, ManagerObject { manager })
            .await
    }
}

#[interface(name = "org.rmachines1.Manager")]
impl ManagerObject {
    /// Every defined machine, sorted by name.
    #[zbus(out_args("machines"))]
    async fn list(&self) -> Vec<(String, String, u32, OwnedObjectPath)> {
        self.manager
            .list()
            .into_iter()
            .map(|info| {
                let path = machine_path(&info.name);
                (info.name, info.state.as_str().to_owned(), info.leader, path)
            })
            .collect()
    }

    #[zbus(out_args("machine"))]
    async fn get_machine(&self, name: &str) -> Result<OwnedObjectPath, Error> {
        validate::machine_name(name)?;
        self.manager.get(name)?;
        Ok(machine_path(name))
    }

    /// Returns once init is executing; the state then goes on to `running`.
    #[zbus(out_args("machine"))]
    async fn start(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "Start").await?;
        validate::machine_name(name)?;
        self.manager.start(name).await?;
        Ok(machine_path(name))
    }

    /// Graceful stop; returns once the machine is stopped and cleaned up.
    async fn stop(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "Stop").await?;
        validate::machine_name(name)?;
        self.manager.stop(name).await?;
        Ok(())
    }

    /// Runs `command` (empty: the login shell) as `user` (empty: root) on a
    /// new pty inside the machine and hands back the pty's master.
    #[zbus(out_args("pty", "session"))]
    async fn shell(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(zvariant::OwnedFd, u32), Error> {
        auth::authorize(connection, &header, ACTION_SHELL, "Shell").await?;
        validate::machine_name(name)?;
        validate::user_name(user)?;
        validate::environment(&environment)?;
        let session = self.manager.shell(name, user, command, environment).await?;
        Ok((zvariant::OwnedFd::from(session.pty_master), session.session))
    }

    /// Re-reads the definitions; running machines are not disturbed.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "Reload").await?;
        let summary = self.manager.reload().await?;
        tracing::info!(
            added = ?summary.added,
            removed = ?summary.removed,
            "definitions reloaded"
        );
        Ok(())
    }

    #[zbus(signal)]
    pub(crate) async fn state_changed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        state: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub(crate) async fn shell_exited(
        emitter: &SignalEmitter<'_>,
        session: u32,
        status: i32,
    ) -> zbus::Result<()>;
}
