//! The link to one machine's supervisor: its control socket, spoken in the
//! one line codec of the control protocol ([`protocol::encode_line`],
//! [`protocol::decode_line`]). Statuses come in, in order, on a channel;
//! commands go out through a handle. When the supervisor goes away the
//! status channel ends.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use crate::runtime::paths;
use crate::runtime::protocol::{self, Command, Status};

/// What the manager holds while a supervisor runs: a way to command it and
/// its latest status (`None` until its first). Cheap to clone.
#[derive(Clone)]
pub(crate) struct SupervisorLink {
    commands: mpsc::UnboundedSender<Command>,
    pub(crate) status: watch::Receiver<Option<Status>>,
}

impl SupervisorLink {
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        status: watch::Receiver<Option<Status>>,
    ) -> Self {
        SupervisorLink { commands, status }
    }

    /// Sends `command`; a supervisor already gone is no error (its end
    /// arrives as the end of its statuses).
    pub(crate) fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Waits until the supervisor's status says its machine is no longer
    /// active, then until the link is let go (the manager has taken in
    /// the supervisor's end): no polling.
    pub(crate) async fn wait_stopped(mut self) {
        loop {
            let done = self
                .status
                .borrow_and_update()
                .as_ref()
                .is_some_and(|st| !st.state.is_active());
            if done || self.status.changed().await.is_err() {
                break;
            }
        }
        while self.status.changed().await.is_ok() {}
    }
}

/// Connects to the supervisor of the machine whose directory is `dir`
/// (an error when none runs).
pub(crate) async fn connect(dir: &Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(dir.join(paths::CONTROL)).await
}

/// Starts the task that speaks to a supervisor over `stream`: returns where
/// to send commands and where its statuses arrive. A line that does not
/// decode is logged and skipped; end of stream or a write error ends it.
pub(crate) fn open(
    name: &str,
    stream: UnixStream,
) -> (
    mpsc::UnboundedSender<Command>,
    mpsc::UnboundedReceiver<Status>,
) {
    let (commands, mut command_rx) = mpsc::unbounded_channel::<Command>();
    let (status_tx, statuses) = mpsc::unbounded_channel();
    let name = name.to_owned();
    tokio::spawn(async move {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => match protocol::decode_line::<Status>(line.as_bytes()) {
                        Ok(status) => {
                            if status_tx.send(status).is_err() {
                                break;
                            }
                        }
                        Err(err) => tracing::warn!(machine = %name, %err, "bad status from supervisor"),
                    },
                    _ => break,
                },
                Some(command) = command_rx.recv() => {
                    let Ok(line) = protocol::encode_line(&command) else { break };
                    if write.write_all(&line).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (commands, statuses)
}
