//! `shell`: runs a command in a machine, on a pty whose terminal it relays
//! (`Shell`) when stdin and stdout are terminals or with `-t`, else (or with
//! `-T`) with rmachinectl's own stdin, stdout and stderr (`Execute`): the
//! bytes then go straight between the caller's files and the command.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use futures_util::StreamExt;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use super::terminal::{self, RawMode};
use super::CliError;
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Args)]
#[command(after_long_help = SHELL_NOTES)]
pub(crate) struct ShellOptions {
    /// The machine.
    name: String,
    /// Always run the command on a pty (as when stdin and stdout are
    /// terminals).
    #[arg(short = 't', long = "tty", conflicts_with = "no_tty")]
    tty: bool,
    /// Never use a pty: the command gets rmachinectl's own stdin, stdout and
    /// stderr (the default unless both stdin and stdout are terminals).
    #[arg(short = 'T', long = "no-tty")]
    no_tty: bool,
    /// The user inside the machine (name or uid); default root.
    #[arg(long, value_name = "USER", default_value = "")]
    uid: String,
    /// Extra environment for the command.
    #[arg(long, value_name = "K=V")]
    setenv: Vec<String>,
    /// The command and its arguments (after `--`); default the login shell.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The extra section of `rmachinectl-shell(1)`.
const SHELL_NOTES: &str = "\
Without a terminal on both stdin and stdout (or with -T), the command gets \
rmachinectl's own stdin, stdout and stderr through the Manager's Execute \
method: bytes arrive exactly, stderr stays apart, end of file and SIGPIPE \
behave as in a local pipe. With -t (or two terminals) it runs on a pty \
(Shell) whose terminal rmachinectl relays in raw mode. The exit status is \
the command's, 128+N for signal N. If rmachinectl ends first (Ctrl-C, \
timeout), rmachined hangs the command up.

Limits: at most 8192 arguments, 4096 environment entries, 131071 bytes \
each, 1 MiB in all (org.rmachines1.TooLarge).

The same without rmachinectl, through D-Bus (busctl passes its own fds \
0, 1 and 2, from systemd 257 on; the session's end and exit status come \
as the ShellExited signal):

    busctl call org.rmachines1 /org/rmachines1 org.rmachines1.Manager \\
        Execute ssasashhh web \"\" 2 /bin/echo hello 0 0 1 2

Examples:

    pg_dump db | rmachinectl shell web -- psql
    tar c . | rmachinectl shell web -- tar x -C /srv
    rmachinectl shell -t web -- top";

/// How often the output relay looks at whether the session has ended.
const DRAIN_POLL_MS: u16 = 100;

impl ShellOptions {
    /// `--setenv`, and on a terminal the caller's `TERM` unless given.
    fn pty_environment(&self, interactive: bool) -> Vec<String> {
        let mut environment = self.setenv.clone();
        if interactive && !environment.iter().any(|entry| entry.starts_with("TERM=")) {
            if let Ok(term) = std::env::var("TERM") {
                environment.push(format!("TERM={term}"));
            }
        }
        environment
    }

    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        // The daemon's own check, made before calling (the sentence then
        // needs no round trip).
        crate::dbus::validate::check_environment(&self.setenv)
            .map_err(|why| CliError::Failed(format!("--setenv: {why}")))?;
        let use_pty =
            self.tty || (!self.no_tty && terminal::stdin_is_tty() && terminal::stdout_is_tty());
        if !use_pty {
            return self.run_direct(manager).await;
        }
        let interactive = terminal::stdin_is_tty();
        let environment = self.pty_environment(interactive);

        // Subscribe before calling Shell: a quick command may be done before
        // the reply arrives.
        let mut exits = manager.receive_shell_exited().await?;
        let mut owner = manager.inner().receive_owner_changed().await?;
        let mut winch = signal(SignalKind::window_change())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;

        let command: Vec<&str> = self.command.iter().map(String::as_str).collect();
        let environment: Vec<&str> = environment.iter().map(String::as_str).collect();
        // The call itself may wait (polkit asks a person): signals end it too.
        let (pty, session) = tokio::select! {
            reply = manager.shell(&self.name, &self.uid, &command, &environment) => reply?,
            _ = hangup.recv() => return Ok(128 + libc::SIGHUP),
            _ = terminate.recv() => return Ok(128 + libc::SIGTERM),
            _ = interrupt.recv() => return Ok(128 + libc::SIGINT),
        };
        let pty: OwnedFd = pty.into();

        let (_raw_mode, eof_char) = prepare_terminal(interactive, &pty)?;

        let exited = Arc::new(AtomicBool::new(false));
        spawn_input_relay(std::io::stdin(), File::from(pty.try_clone()?), eof_char);
        let mut drained = spawn_output_relay(File::from(pty.try_clone()?), Arc::clone(&exited));
        let mut output_done = false;

        let mut status = None;
        loop {
            if let (Some(status), true) = (status, output_done) {
                return Ok(exit_code(status));
            }
            tokio::select! {
                signal = exits.next() => {
                    let Some(signal) = signal else {
                        return Err(CliError::Failed("lost the bus before the command ended".into()));
                    };
                    let args = signal.args()?;
                    if *args.session() == session {
                        status = Some(*args.status());
                        exited.store(true, Ordering::SeqCst);
                    }
                }
                how = &mut drained, if !output_done => {
                    if matches!(how, Ok(Drained::StdoutClosed)) {
                        return Ok(128 + libc::SIGPIPE);
                    }
                    output_done = true;
                }
                _ = winch.recv() => {
                    if interactive {
                        let _ = terminal::copy_window_size(std::io::stdin().as_fd(), pty.as_fd());
                    }
                }
                change = owner.next() => {
                    if matches!(change, Some(None) | None) {
                        return Err(CliError::Failed("rmachined left the bus before the command ended".into()));
                    }
                }
                _ = hangup.recv() => return Ok(128 + libc::SIGHUP),
                _ = terminate.recv() => return Ok(128 + libc::SIGTERM),
                _ = interrupt.recv() => return Ok(128 + libc::SIGINT),
            }
        }
    }
}

/// On a terminal: the pty takes its size, the terminal goes raw (restored
/// when the guard drops). Otherwise the pty passes bytes as a pipe would;
/// returns the character that makes it see end of file.
fn prepare_terminal(
    interactive: bool,
    pty: &OwnedFd,
) -> Result<(Option<RawMode>, Option<u8>), CliError> {
    if interactive {
        let _ = terminal::copy_window_size(std::io::stdin().as_fd(), pty.as_fd());
        let raw = RawMode::enter().map_err(|error| {
            CliError::Failed(format!("cannot put the terminal in raw mode: {error}"))
        })?;
        Ok((Some(raw), None))
    } else {
        let eof = terminal::pipe_mode(pty.as_fd())
            .map_err(|error| CliError::Failed(format!("cannot set up the pty: {error}")))?;
        Ok((None, Some(eof)))
    }
}
impl ShellOptions {
    /// `Execute` with our own stdin, stdout and stderr.
    async fn run_direct(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        let command: Vec<&str> = self.command.iter().map(String::as_str).collect();
        let environment: Vec<&str> = self.setenv.iter().map(String::as_str).collect();
        let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
        execute(
            manager,
            &self.name,
            &self.uid,
            &command,
            &environment,
            [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()],
        )
        .await
    }
}

/// Runs `command` in machine `name` through `Execute` with `stdio` as its
/// fd 0, 1 and 2 and returns its exit status (128+N for signal N) once
/// `ShellExited` reports it. SIGHUP, SIGTERM and SIGINT end the wait (also
/// while the call is pending) with 128+N; rmachined then hangs the command
/// up, since our connection is gone.
pub(crate) async fn execute(
    manager: &ManagerProxy<'static>,
    name: &str,
    user: &str,
    command: &[&str],
    environment: &[&str],
    stdio: [std::os::fd::BorrowedFd<'_>; 3],
) -> Result<i32, CliError> {
    // Subscribed before the call: a quick command may end before the reply
    // arrives, so its ShellExited may come first.
    let mut exits = manager.receive_shell_exited().await?;
    let mut owner = manager.inner().receive_owner_changed().await?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let [stdin, stdout, stderr] = stdio;
    let call = manager.execute(
        name,
        user,
        command,
        environment,
        stdin.into(),
        stdout.into(),
        stderr.into(),
    );
    tokio::pin!(call);
    let mut early = Vec::new();
    let lost = || CliError::Failed("lost the bus before the command ended".into());
    let session = loop {
        tokio::select! {
            reply = &mut call => break reply?,
            signal = exits.next() => {
                let args = signal.ok_or_else(lost)?.args().map(|a| (*a.session(), *a.status()))?;
                early.push(args);
            }
            _ = hangup.recv() => return Ok(128 + libc::SIGHUP),
            _ = terminate.recv() => return Ok(128 + libc::SIGTERM),
            _ = interrupt.recv() => return Ok(128 + libc::SIGINT),
        }
    };
    if let Some((_, status)) = early.iter().find(|(s, _)| *s == session) {
        return Ok(exit_code(*status));
    }
    loop {
        tokio::select! {
            signal = exits.next() => {
                let (exited, status) =
                    signal.ok_or_else(lost)?.args().map(|a| (*a.session(), *a.status()))?;
                if exited == session {
                    return Ok(exit_code(status));
                }
            }
            change = owner.next() => {
                if matches!(change, Some(None) | None) {
                    return Err(CliError::Failed("rmachined left the bus before the command ended".into()));
                }
            }
            _ = hangup.recv() => return Ok(128 + libc::SIGHUP),
            _ = terminate.recv() => return Ok(128 + libc::SIGTERM),
            _ = interrupt.recv() => return Ok(128 + libc::SIGINT),
        }
    }
}

/// `ShellExited` reports an exit code or 128+signal; the process exits with it.
fn exit_code(status: i32) -> i32 {
    status.clamp(0, 255)
}

/// Copies `input` (stdin) to the pty. With `eof_char` (piped input), sends
/// the terminal's EOF character when the input ends so the command sees it end.
fn spawn_input_relay(
    mut input: impl Read + Send + 'static,
    mut pty: File,
    eof_char: Option<u8>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        let mut last = b'\n';
        loop {
            match input.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    last = buffer[n - 1];
                    if pty.write_all(&buffer[..n]).is_err() {
                        return;
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if let Some(eof) = eof_char {
            // In canonical mode EOF on a partial line only pushes that line
            // out; a second EOF then ends the input.
            let eofs: &[u8] = if last == b'\n' { &[eof] } else { &[eof, eof] };
            for byte in eofs {
                if pty.write_all(&[*byte]).is_err() {
                    return;
                }
            }
        }
    })
}

/// Copies the pty to stdout until the pty reports EOF/EIO (every slave is
/// closed) or, once the session has exited, no more output is pending.
/// The returned receiver fires when the output is drained.
fn spawn_output_relay(mut pty: File, exited: Arc<AtomicBool>) -> oneshot::Receiver<Drained> {
    let (done, drained) = oneshot::channel();
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout().lock();
        let mut buffer = [0u8; 4096];
        loop {
            let mut fds = [PollFd::new(pty.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(DRAIN_POLL_MS)) {
                Ok(0) => {
                    if exited.load(Ordering::SeqCst) {
                        break;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
            match pty.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buffer[..n])
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        // Our reader is gone (`| head`): end like a
                        // process killed by SIGPIPE; closing the pty then
                        // hangs up the command in the machine.
                        let _ = done.send(Drained::StdoutClosed);
                        return;
                    }
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                // EIO: the last slave fd closed.
                Err(_) => break,
            }
        }
        let _ = stdout.flush();
        let _ = done.send(Drained::AllWritten);
    });
    drained
}

/// How the output relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    AllWritten,
    StdoutClosed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Piped input through a real pty: no echo, `\n` kept, and the EOF
    /// character ends the command's input even without a final newline.
    #[test]
    fn piped_input_reaches_the_command_and_ends_it() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let eof = terminal::pipe_mode(pty.master.as_fd()).expect("pipe mode");
        let slave = File::from(pty.slave);
        let mut child = Command::new("cat")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cat");
        drop(slave);
        let master = File::from(pty.master);
        let input = std::io::Cursor::new(b"hi\nno newline".to_vec());
        spawn_input_relay(input, master.try_clone().unwrap(), Some(eof))
            .join()
            .unwrap();
        assert!(child.wait().unwrap().success(), "cat saw EOF and exited");
        let mut output = Vec::new();
        let mut master = master;
        let mut buffer = [0u8; 256];
        loop {
            match master.read(&mut buffer) {
                Ok(0) | Err(_) => break, // EIO once the slave is closed
                Ok(n) => output.extend_from_slice(&buffer[..n]),
            }
        }
        assert_eq!(String::from_utf8_lossy(&output), "hi\nno newline");
    }

    #[test]
    fn exit_codes_fit_a_byte() {
        assert_eq!(exit_code(7), 7);
        assert_eq!(exit_code(128 + 9), 137);
        assert_eq!(exit_code(-1), 0);
        assert_eq!(exit_code(1000), 255);
    }
}
