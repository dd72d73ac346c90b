//! `-H [USER@]HOST[:PORT]`: rmachinectl on another host, over ssh.
//!
//! Like `machinectl -H`, rmachinectl starts `ssh -xT HOST` running
//! `systemd-stdio-bridge` there and speaks D-Bus over the ssh pipe (zbus's
//! `unixexec:` transport: the child's stdin and stdout are the bus). The
//! bridge is a D-Bus server towards the pipe that accepts the EXTERNAL
//! handshake without checking the uid in it (no credentials cross a pipe),
//! and a client of the remote system bus as the ssh user: rmachined sees,
//! and polkit checks, the remote user, exactly as for a local call there.
//!
//! Descriptors cannot cross ssh, so the verbs that pass a pty or the
//! caller's stdio to rmachined (`shell`; `logs -f` belongs here too) run
//! the remote host's own rmachinectl through ssh instead: `ssh -tt` for a
//! terminal (the remote rmachinectl relays its pty), `ssh -T` for pipes
//! (bytes and end of file pass unchanged; ssh exits with the remote
//! command's status).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::str::FromStr;

use zbus::address::transport::{Transport, Unixexec};
use zbus::{Address, Connection};

use super::CliError;

/// The ssh client rmachinectl runs; `RMACHINES_SSH` overrides it (a path or a
/// wrapper script adding options, like `SYSTEMD_SSH` for machinectl).
const SSH_ENV: &str = "RMACHINES_SSH";

/// The default for `-H`.
const HOST_ENV: &str = "RMACHINES_HOST";

/// Run on the remote host by its login shell: the bridge to the system bus
/// the remote environment names (`DBUS_SYSTEM_BUS_ADDRESS`, as every D-Bus
/// client there would use), since `systemd-stdio-bridge --system` always
/// takes the default socket. Single-quoted for the login shell, which may
/// not be a POSIX one.
const REMOTE_BRIDGE: &str = r#"sh -c 'for b in systemd-stdio-bridge /usr/bin/systemd-stdio-bridge /usr/lib/systemd/systemd-stdio-bridge /lib/systemd/systemd-stdio-bridge; do if command -v "$b" >/dev/null 2>&1; then exec "$b" --bus-path="${DBUS_SYSTEM_BUS_ADDRESS:-unix:path=/run/dbus/system_bus_socket}"; fi; done; echo "$(hostname): systemd-stdio-bridge not found (it comes with the systemd package); rmachinectl -H needs it on the remote host" >&2; exit 127'"#;

/// A remote host as `-H` names it: `[USER@]HOST[:PORT]`, an IPv6 address in
/// brackets (`[2001:db8::1]:2222`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    user: Option<String>,
    host: String,
    port: Option<u16>,
}

impl FromStr for Host {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (user, rest) = match text.rsplit_once('@') {
            Some((user, rest)) => (Some(user), rest),
            None => (None, text),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: missing ] after the IPv6 address"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("{text:?}: expected :PORT after ]")),
                },
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = port
            .map(|port| {
                port.parse::<u16>()
                    .ok()
                    .filter(|port| *port != 0)
                    .ok_or_else(|| format!("{text:?}: {port:?} is not a port number"))
            })
            .transpose()?;
        let valid = |part: &str| {
            !part.is_empty()
                && !part.starts_with('-')
                && !part
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '/')
        };
        if !valid(host) {
            return Err(format!("{text:?}: not a host name ([USER@]HOST[:PORT])"));
        }
        if let Some(user) = user {
            if !valid(user) {
                return Err(format!("{text:?}: not a user name ([USER@]HOST[:PORT])"));
            }
        }
        Ok(Host {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl Host {
    /// ssh's arguments up to and including the destination.
    fn ssh_args(&self, terminal: Terminal) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-x".into(), terminal.flag().into()];
        if let Some(port) = self.port {
            args.push("-p".into());
            args.push(port.to_string().into());
        }
        args.push("--".into());
        args.push(match &self.user {
            Some(user) => format!("{user}@{}", self.host).into(),
            None => self.host.clone().into(),
        });
        args
    }
}

/// `RMACHINES_HOST`, when set and not empty.
pub(crate) fn host_from_environment() -> Result<Option<Host>, String> {
    match std::env::var(HOST_ENV) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .map(Some)
            .map_err(|error| format!("{HOST_ENV}: {error}")),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{HOST_ENV} is not UTF-8")),
    }
}

fn ssh_program() -> OsString {
    std::env::var_os(SSH_ENV)
        .filter(|program| !program.is_empty())
        .unwrap_or_else(|| "ssh".into())
}

/// Whether ssh asks the remote sshd for a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Terminal {
    /// `-T`: plain pipes.
    No,
    /// `-tt`: a pty on the remote side.
    Yes,
}

impl Terminal {
    fn flag(self) -> &'static str {
        match self {
            Terminal::No => "-T",
            Terminal::Yes => "-tt",
        }
    }
}

/// A bus connection to the system bus of `host`, through ssh and the
/// remote `systemd-stdio-bridge`.
pub(crate) async fn connect(host: &Host) -> Result<Connection, CliError> {
    let mut args = host.ssh_args(Terminal::No);
    args.push(REMOTE_BRIDGE.into());
    let program = ssh_program();
    let transport = Unixexec::new(PathBuf::from(&program), None, args);
    zbus::connection::Builder::address(Address::from(Transport::Unixexec(transport)))?
        .build()
        .await
        .map_err(CliError::Remote)
}

/// Runs the remote host's rmachinectl with `verb_args` through ssh, with
/// this process's stdin, stdout and stderr; returns its exit status (ssh's
/// own failures are 255, as ssh reports them).
pub(crate) async fn run_remote_cli(
    host: &Host,
    verb_args: &[OsString],
    terminal: Terminal,
) -> Result<i32, CliError> {
    let mut command_line = b"rmachinectl".to_vec();
    for arg in verb_args {
        command_line.push(b' ');
        command_line.extend_from_slice(&shell_quote(arg));
    }
    let mut args = host.ssh_args(terminal);
    args.push(OsStr::from_bytes(&command_line).to_owned());
    let program = ssh_program();
    let status = tokio::process::Command::new(&program)
        .args(&args)
        .status()
        .await
        .map_err(|error| {
            CliError::Failed(format!(
                "cannot run {} to reach {host}: {error}",
                program.to_string_lossy()
            ))
        })?;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1))
}

/// The arguments from the verb on, as typed: what follows `-H HOST` (or
/// `--host HOST`, `--host=HOST`, `-HHOST`) and any other global option.
pub(crate) fn verb_args(mut args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let _program = args.next();
    let mut args = args.peekable();
    while let Some(arg) = args.peek() {
        let bytes = arg.as_bytes();
        if bytes == b"-H" || bytes == b"--host" {
            args.next();
            args.next();
        } else if bytes.starts_with(b"-") && bytes != b"-" {
            args.next();
        } else {
            break;
        }
    }
    args.collect()
}

/// `arg` in single quotes for a remote shell (POSIX sh, bash, zsh, fish all
/// take `'...'` literally, with `'\''` for a quote).
fn shell_quote(arg: &OsStr) -> Vec<u8> {
    let mut quoted = vec![b'\''];
    for &byte in arg.as_bytes() {
        if byte == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(byte);
        }
    }
    quoted.push(b'\'');
    quoted
}

/// Which terminal mode `shell` over ssh uses: the `-t`/`-T` the user gave
/// (before `--`), else a terminal when stdin and stdout both are one, as
/// for a local `shell`.
pub(crate) fn terminal_for(verb_args: &[OsString]) -> Terminal {
    use std::io::IsTerminal;
    for arg in verb_args.iter().skip(1) {
        match arg.as_bytes() {
            b"--" => break,
            b"-t" | b"--tty" => return Terminal::Yes,
            b"-T" | b"--no-tty" => return Terminal::No,
            _ => {}
        }
    }
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        Terminal::Yes
    } else {
        Terminal::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(user: Option<&str>, name: &str, port: Option<u16>) -> Host {
        Host {
            user: user.map(str::to_owned),
            host: name.to_owned(),
            port,
        }
    }

    #[test]
    fn host_forms_parse_and_print_back() {
        for (text, parsed) in [
            ("web1", host(None, "web1", None)),
            ("root@web1", host(Some("root"), "web1", None)),
            (
                "ops@10.0.0.5:2222",
                host(Some("ops"), "10.0.0.5", Some(2222)),
            ),
            ("[2001:db8::1]:22", host(None, "2001:db8::1", Some(22))),
            ("u@[fd00::2]", host(Some("u"), "fd00::2", None)),
        ] {
            assert_eq!(text.parse::<Host>().as_ref(), Ok(&parsed), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_hosts_are_refused() {
        for text in [
            "",
            "-oProxyCommand=x",
            "u@",
            "@h",
            "h:0",
            "h:99999",
            "h:ssh",
            "[::1",
            "[::1]x",
            "a b",
            "-u@h",
        ] {
            assert!(text.parse::<Host>().is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn ssh_gets_the_port_and_destination_after_options() {
        let args = "ops@h:2200".parse::<Host>().unwrap().ssh_args(Terminal::No);
        assert_eq!(args, ["-x", "-T", "-p", "2200", "--", "ops@h"]);
    }

    #[test]
    fn verb_args_drop_the_host_option() {
        let os = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        for argv in [
            &[
                "rmachinectl",
                "-H",
                "h",
                "shell",
                "web",
                "--",
                "sh",
                "-H",
                "x",
            ][..],
            &[
                "rmachinectl",
                "--host",
                "h",
                "shell",
                "web",
                "--",
                "sh",
                "-H",
                "x",
            ],
            &[
                "rmachinectl",
                "--host=h",
                "shell",
                "web",
                "--",
                "sh",
                "-H",
                "x",
            ],
            &["rmachinectl", "-Hh", "shell", "web", "--", "sh", "-H", "x"],
        ] {
            assert_eq!(
                verb_args(os(argv).into_iter()),
                os(&["shell", "web", "--", "sh", "-H", "x"]),
                "{argv:?}"
            );
        }
    }

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote(OsStr::new("a b")), b"'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), b"'it'\\''s'");
        assert_eq!(shell_quote(OsStr::new("")), b"''");
    }

    #[test]
    fn explicit_terminal_flags_win() {
        let os = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(terminal_for(&os(&["shell", "-t", "web"])), Terminal::Yes);
        assert_eq!(terminal_for(&os(&["shell", "-T", "web"])), Terminal::No);
        // After `--` it is the command's own flag.
        assert_eq!(
            terminal_for(&os(&["shell", "web", "--", "ls", "-t"])),
            terminal_for(&os(&["shell", "web"]))
        );
    }
}
