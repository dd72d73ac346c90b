//! The control protocol between a machine's supervisor and its clients (the
//! daemon, tests): newline-delimited JSON over the `control` socket in the
//! machine's state directory. The supervisor sends a [`Status`] on connect and
//! on every change; clients send [`Command`]s.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The lifecycle state of a machine, as the SPEC names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl MachineState {
    pub const ALL: [MachineState; 5] = [
        MachineState::Stopped,
        MachineState::Starting,
        MachineState::Running,
        MachineState::Stopping,
        MachineState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Stopped => "stopped",
            MachineState::Starting => "starting",
            MachineState::Running => "running",
            MachineState::Stopping => "stopping",
            MachineState::Failed => "failed",
        }
    }

    /// A machine in this state has a supervisor and an init (or is about to).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            MachineState::Starting | MachineState::Running | MachineState::Stopping
        )
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown machine state {s:?}"))
    }
}

/// What a supervisor reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: MachineState,
    /// Host pid of init; 0 while none is executing.
    pub leader: u32,
    /// Host pid of the supervisor.
    pub supervisor: u32,
    /// Realtime microseconds of the last state change.
    pub since: u64,
    /// Why the machine failed; empty otherwise.
    pub error: String,
    /// How many times init was started by this supervisor (reboots count).
    pub boots: u32,
}

/// What a client asks of a supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Graceful stop: the stop signal, SIGKILL after the stop timeout.
    Stop,
    /// SIGKILL now.
    Kill,
    /// `[resources]` changed and the daemon applied them to the running
    /// machine: keep them for its next boots.
    SetResources(crate::definition::Resources),
}

/// One message of the control protocol as its line on the wire: JSON and a
/// newline. The only encoder of the protocol (supervisor, daemon, `Client`).
pub fn encode_line<T: Serialize>(message: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    Ok(line)
}

/// The message one line of the control protocol carries (with or without
/// its newline). The only decoder of the protocol.
pub fn decode_line<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(line))
}

pub fn now_usec() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A blocking client, for tests and tools; the daemon has an async one.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub last: Option<Status>,
}

impl Client {
    pub fn connect(control: &Path) -> std::io::Result<Client> {
        Client::from_stream(UnixStream::connect(control)?)
    }

    /// A client on an existing connection (see `supervisor::Launched`).
    pub fn from_stream(stream: UnixStream) -> std::io::Result<Client> {
        let writer = stream.try_clone()?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            last: None,
        })
    }

    pub fn send(&mut self, command: Command) -> std::io::Result<()> {
        self.writer.write_all(&encode_line(&command)?)
    }

    /// The next status, or `None` at end of stream (the supervisor exited).
    pub fn next(&mut self, timeout: Duration) -> std::io::Result<Option<Status>> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let status: Status = decode_line(line.as_bytes())?;
        self.last = Some(status.clone());
        Ok(Some(status))
    }

    /// Reads statuses until `pred` holds for one, or the stream ends, or
    /// `timeout` passes. Returns the matching status.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> std::io::Result<Option<Status>> {
        if let Some(last) = &self.last {
            if pred(last) {
                return Ok(Some(last.clone()));
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no matching status within {timeout:?}; last: {:?}",
                        self.last
                    ),
                ));
            }
            match self.next(left)? {
                None => return Ok(None),
                Some(status) if pred(&status) => return Ok(Some(status)),
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for state in MachineState::ALL {
            assert_eq!(state.as_str().parse::<MachineState>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert!("bogus".parse::<MachineState>().is_err());
    }

    #[test]
    fn commands_are_lowercase_words_on_the_wire() {
        assert_eq!(serde_json::to_string(&Command::Stop).unwrap(), "\"stop\"");
        assert_eq!(
            serde_json::from_str::<Command>("\"kill\"").unwrap(),
            Command::Kill
        );
    }
}
