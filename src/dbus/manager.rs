//! `org.rmachines1.Manager` at `/org/rmachines1`.

use futures_util::StreamExt;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{self, OwnedObjectPath};
use zbus::{interface, Connection};

use super::error::Error;
use super::{auth, machine_path, validate, ACTION_MANAGE, ACTION_SHELL, MANAGER_PATH};
use crate::image::Format;
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
        validate::command_size(&command, &environment)?;
        validate::environment(&environment)?;
        // The reply carries a descriptor: a caller that cannot take one
        // would get no reply at all (the bus drops it), and its session
        // would run for nobody.
        if let Some(caller) = header.sender() {
            if !caller_takes_fds(connection, caller).await.unwrap_or(true) {
                return Err(Error::FdPassingUnsupported(
                    "Shell returns a pty as a Unix file descriptor, and this bus connection did not negotiate descriptor passing: connect over a Unix socket with a client that negotiates it (NEGOTIATE_UNIX_FD)".into(),
                ));
            }
        }
        let session = self.manager.shell(name, user, command, environment).await?;
        watch_caller(connection, &header, &self.manager, session.session);
        Ok((zvariant::OwnedFd::from(session.pty_master), session.session))
    }

    /// Runs `command` (empty: the login shell) as `user` (empty: root)
    /// inside the machine with the caller's `stdin`, `stdout` and `stderr`
    /// as its fd 0, 1 and 2: no pty, no relay. Its end is `ShellExited`.
    #[zbus(out_args("session"))]
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
        stdin: zvariant::OwnedFd,
        stdout: zvariant::OwnedFd,
        stderr: zvariant::OwnedFd,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<u32, Error> {
        auth::authorize(connection, &header, ACTION_SHELL, "Execute").await?;
        validate::machine_name(name)?;
        validate::user_name(user)?;
        validate::command_size(&command, &environment)?;
        validate::environment(&environment)?;
        let stdio = [stdin.into(), stdout.into(), stderr.into()];
        let session = self
            .manager
            .execute(name, user, command, environment, stdio)
            .await?;
        watch_caller(connection, &header, &self.manager, session);
        Ok(session)
    }

    /// The machine's console log, opened read-only: `console.log.1` (the
    /// rotated part) first when there is one, then `console.log`.
    #[zbus(out_args("logs"))]
    async fn open_console_log(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<Vec<zvariant::OwnedFd>, Error> {
        auth::authorize(connection, &header, ACTION_SHELL, "OpenConsoleLog").await?;
        validate::machine_name(name)?;
        Ok(self
            .manager
            .console_logs(name)?
            .into_iter()
            .map(zvariant::OwnedFd::from)
            .collect())
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

    /// Imports the file, pipe or directory `source` (an OCI image layout)
    /// as image `name`; `format` is "" (detect), "tar" or "oci", `reference`
    /// picks an OCI manifest by tag ("": the only one). Returns the format,
    /// the bytes and files written and the device nodes dropped.
    #[zbus(out_args("format", "bytes", "files", "devices_dropped"))]
    async fn import_image(
        &self,
        name: &str,
        source: zvariant::OwnedFd,
        format: &str,
        reference: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(String, u64, u64, u64), Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "ImportImage").await?;
        validate::image_name(name)?;
        let format = format.parse::<Format>().map_err(Error::InvalidArgument)?;
        validate::reference(reference)?;
        let reference = (!reference.is_empty()).then(|| reference.to_owned());
        let info = self
            .manager
            .import_image(name, std::os::fd::OwnedFd::from(source), format, reference)
            .await?;
        Ok((
            info.format,
            info.size,
            info.stats.files,
            info.stats.devices_dropped,
        ))
    }

    /// Every image: name, format, bytes, import time (realtime µs) and the
    /// machines whose definitions name it.
    #[zbus(out_args("images"))]
    async fn list_images(&self) -> Result<Vec<(String, String, u64, u64, Vec<String>)>, Error> {
        Ok(self
            .manager
            .list_images()?
            .into_iter()
            .map(|(info, users)| (info.name, info.format, info.size, info.imported, users))
            .collect())
    }

    /// Removes an image; refused while a machine's definition names it.
    async fn remove_image(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "RemoveImage").await?;
        validate::image_name(name)?;
        self.manager.remove_image(name).await?;
        Ok(())
    }

    /// Writes the definition of machine `name` made from `image` (nothing
    /// is copied) and returns its object.
    #[zbus(out_args("machine"))]
    async fn create_machine(
        &self,
        name: &str,
        image: &str,
        ephemeral: bool,
        autostart: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "CreateMachine").await?;
        validate::machine_name(name)?;
        validate::image_name(image)?;
        self.manager
            .create_machine(name, image, ephemeral, autostart)
            .await?;
        Ok(machine_path(name))
    }

    /// Deletes a stopped machine's definition and writable layer.
    async fn remove_machine(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), Error> {
        auth::authorize(connection, &header, ACTION_MANAGE, "RemoveMachine").await?;
        validate::machine_name(name)?;
        self.manager.remove_machine(name).await?;
        Ok(())
    }

    #[zbus(signal)]
    pub(crate) async fn import_progress(
        emitter: &SignalEmitter<'_>,
        name: &str,
        done: u64,
        total: u64,
    ) -> zbus::Result<()>;

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

/// Hangs `session` up when its caller leaves the bus (`timeout`, Ctrl-C or
/// a kill of rmachinectl): a command is never left running for nobody.
fn watch_caller(connection: &Connection, header: &Header<'_>, manager: &Manager, session: u32) {
    let Some(caller) = header.sender().map(|s| s.to_owned()) else {
        return;
    };
    let connection = connection.clone();
    let manager = manager.clone();
    tokio::spawn(async move {
        let watch = async {
            let bus = zbus::fdo::DBusProxy::new(&connection).await?;
            let mut changes = bus
                .receive_name_owner_changed_with_args(&[(0, caller.as_str())])
                .await?;
            // Gone before the match was in place?
            if !bus.name_has_owner(caller.as_ref().into()).await? {
                return Ok::<(), zbus::Error>(());
            }
            let mut events = manager.subscribe();
            if !manager.session_running(session) {
                return Err(zbus::Error::Failure(String::new()));
            }
            loop {
                tokio::select! {
                    change = changes.next() => match change {
                        Some(change) => {
                            if change.args()?.new_owner().is_none() {
                                return Ok(());
                            }
                        }
                        None => return Ok(()),
                    },
                    event = events.recv() => match event {
                        Ok(crate::manager::Event::ShellExited { session: ended, .. }) if ended == session => {
                            return Err(zbus::Error::Failure(String::new()));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return Err(zbus::Error::Failure(String::new()));
                        }
                        _ => {
                            if !manager.session_running(session) {
                                return Err(zbus::Error::Failure(String::new()));
                            }
                        }
                    },
                }
            }
        };
        // Ok: the caller left; an error: the session ended first (or the
        // watch could not be set up, then the session runs to its end).
        if watch.await.is_ok() && manager.hang_up(session) {
            tracing::info!(session, caller = %caller, "caller left the bus: session hung up");
        }
    });
}

/// Whether `caller`'s bus connection takes Unix fds. The bus tells only by
/// refusing: a unicast signal carrying one (interface
/// `org.rmachines1.FdProbe`, which clients ignore) comes back as an error
/// when not. A round trip to the bus afterwards orders that error before
/// its reply.
async fn caller_takes_fds(
    connection: &Connection,
    caller: &zbus::names::UniqueName<'_>,
) -> zbus::Result<bool> {
    use futures_util::FutureExt;
    let null = std::fs::File::open("/dev/null")
        .map_err(|e| zbus::Error::Failure(format!("opening /dev/null: {e}")))?;
    let probe = zbus::message::Message::signal(MANAGER_PATH, "org.rmachines1.FdProbe", "Probe")?
        .destination(caller.as_str())?
        .build(&(zvariant::Fd::from(&null),))?;
    let serial = probe.primary_header().serial_num();
    let mut incoming = zbus::MessageStream::from(connection);
    connection.send(&probe).await?;
    zbus::fdo::DBusProxy::new(connection)
        .await?
        .get_id()
        .await?;
    while let Some(Some(message)) = incoming.next().now_or_never() {
        let Ok(message) = message else { continue };
        let header = message.header();
        if header.message_type() == zbus::message::Type::Error
            && header.reply_serial() == Some(serial)
        {
            return Ok(false);
        }
    }
    Ok(true)
}
