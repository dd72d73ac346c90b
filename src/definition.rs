//! Machine definitions: `/etc/rmachines/<name>.toml` parsed and validated into
//! plain data. Nothing outside this module sees TOML.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A validated machine definition. Every field has its default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub name: String,
    /// The file this definition was read from.
    pub file: PathBuf,
    pub root: PathBuf,
    pub boot: bool,
    pub command: Vec<String>,
    pub hostname: String,
    pub autostart: bool,
    pub restart: RestartPolicy,
    pub environment: BTreeMap<String, String>,
    pub stop_timeout: Duration,
    pub stop_signal: StopSignal,
    pub notify_ready: NotifyReady,
    pub read_only: bool,
    pub ephemeral: bool,
    pub users: Users,
    pub network: Network,
    pub resources: Resources,
    pub binds: Vec<Bind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

/// The signal that asks the guest's init to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopSignal {
    /// Chosen from the init: SIGRTMIN+3 for systemd, SIGUSR2 for busybox init,
    /// SIGTERM otherwise.
    Auto,
    /// A signal number.
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyReady {
    Auto,
    Yes,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    pub base: UidBase,
    pub size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UidBase {
    Pick,
    Fixed(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub mode: NetworkMode,
    pub address: AddressSpec,
    pub nat: bool,
    pub ports: Vec<PortSpec>,
    /// Empty: the bridge rmachined manages.
    pub bridge: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    Private,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressSpec {
    Auto,
    /// An explicit address with its prefix length.
    Cidr(std::net::IpAddr, u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub host_port: u16,
    pub machine_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Bytes.
    pub memory: Option<u64>,
    /// CPUs, e.g. 1.5.
    pub cpus: Option<f64>,
    pub tasks: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

// ---------------------------------------------------------------------------
// String round trips
// ---------------------------------------------------------------------------

impl RestartPolicy {
    pub const ALL: [RestartPolicy; 3] = [
        RestartPolicy::No,
        RestartPolicy::OnFailure,
        RestartPolicy::Always,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

impl NotifyReady {
    pub const ALL: [NotifyReady; 3] = [NotifyReady::Auto, NotifyReady::Yes, NotifyReady::No];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyReady::Auto => "auto",
            NotifyReady::Yes => "yes",
            NotifyReady::No => "no",
        }
    }
}

impl NetworkMode {
    pub const ALL: [NetworkMode; 2] = [NetworkMode::Private, NetworkMode::None];

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Private => "private",
            NetworkMode::None => "none",
        }
    }
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Display, and FromStr through the `ALL` table, for the enums that are a
/// plain set of words.
macro_rules! word_enum_strings {
    ($ty:ty, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$ty>::ALL
                    .into_iter()
                    .find(|value| value.as_str() == s)
                    .ok_or_else(|| {
                        let expected: Vec<&str> = <$ty>::ALL.iter().map(|v| v.as_str()).collect();
                        format!(
                            "{s:?} is not a valid {}; expected one of: {}",
                            $what,
                            expected.join(", ")
                        )
                    })
            }
        }
    };
}

word_enum_strings!(RestartPolicy, "restart policy");
word_enum_strings!(NotifyReady, "notify_ready setting");
word_enum_strings!(NetworkMode, "network mode");
word_enum_strings!(Protocol, "protocol");

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopSignal::Auto => f.write_str("auto"),
            StopSignal::Signal(sig) => f.write_str(&signal_name(*sig)),
        }
    }
}

impl FromStr for StopSignal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(StopSignal::Auto);
        }
        parse_signal(s).map(StopSignal::Signal).ok_or_else(|| {
            format!(
                "{s:?} is not a signal; expected \"auto\", a name like \"SIGTERM\", \"TERM\" \
                 or \"SIGRTMIN+3\", or a number 1-{}",
                libc::SIGRTMAX()
            )
        })
    }
}

impl fmt::Display for AddressSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressSpec::Auto => f.write_str("auto"),
            AddressSpec::Cidr(addr, prefix) => write!(f, "{addr}/{prefix}"),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.protocol, self.host_port, self.machine_port
        )
    }
}

impl fmt::Display for UidBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UidBase::Pick => f.write_str("pick"),
            UidBase::Fixed(base) => write!(f, "{base}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

/// Classic Linux signals by their name without the `SIG` prefix.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// The conventional name of a signal: `SIGTERM`, `SIGRTMIN+3`; a number
/// without a name (e.g. the libc-reserved 32) is written as the number.
pub fn signal_name(sig: i32) -> String {
    if let Some((name, _)) = SIGNALS.iter().find(|(_, number)| *number == sig) {
        return format!("SIG{name}");
    }
    let rtmin = libc::SIGRTMIN();
    if (rtmin..=libc::SIGRTMAX()).contains(&sig) {
        return match sig - rtmin {
            0 => "SIGRTMIN".to_string(),
            offset => format!("SIGRTMIN+{offset}"),
        };
    }
    sig.to_string()
}

/// Parses `SIGTERM`, `TERM`, `SIGRTMIN+3`, `RTMIN+4`, `SIGRTMAX-1` or a
/// number 1..=SIGRTMAX into a signal number. Names are case-insensitive.
pub fn parse_signal(text: &str) -> Option<i32> {
    let rtmin = libc::SIGRTMIN();
    let rtmax = libc::SIGRTMAX();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let number: i32 = text.parse().ok()?;
        return (1..=rtmax).contains(&number).then_some(number);
    }
    let upper = text.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, number)) = SIGNALS.iter().find(|(name, _)| *name == bare) {
        return Some(*number);
    }
    let rt_offset = |rest: &str| -> Option<i32> {
        if rest.is_empty() {
            return Some(0);
        }
        if !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()
    };
    let number = if let Some(rest) = bare.strip_prefix("RTMIN") {
        let rest = if rest.is_empty() {
            rest
        } else {
            rest.strip_prefix('+')?
        };
        rtmin.checked_add(rt_offset(rest)?)?
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        let rest = if rest.is_empty() {
            rest
        } else {
            rest.strip_prefix('-')?
        };
        rtmax.checked_sub(rt_offset(rest)?)?
    } else {
        return None;
    };
    (rtmin..=rtmax).contains(&number).then_some(number)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a string is not a machine name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a machine name must not be empty")]
    Empty,
    #[error("the machine name {name:?} is {len} characters long; at most 64 are allowed")]
    TooLong { name: String, len: usize },
    #[error("the machine name {name:?} contains a NUL byte")]
    Nul { name: String },
    #[error("the machine name {name:?} contains \"/\"; a name is not a path")]
    Slash { name: String },
    #[error("the machine name {name:?} must start with a lowercase letter or a digit")]
    BadStart { name: String },
    #[error(
        "the machine name {name:?} contains {ch:?}; only lowercase letters, digits, \"-\" and \".\" are allowed"
    )]
    BadChar { name: String, ch: char },
    #[error("the machine name {name:?} contains \"..\"")]
    DotDot { name: String },
}

/// Checks that `name` is a machine name: `[a-z0-9][a-z0-9-.]{0,63}` without `..`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let owned = || name.to_string();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains('\0') {
        return Err(NameError::Nul { name: owned() });
    }
    if name.contains('/') {
        return Err(NameError::Slash { name: owned() });
    }
    let len = name.chars().count();
    if len > 64 {
        return Err(NameError::TooLong { name: owned(), len });
    }
    let is_start = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.starts_with(is_start) {
        return Err(NameError::BadStart { name: owned() });
    }
    if let Some(ch) = name
        .chars()
        .find(|&c| !(is_start(c) || c == '-' || c == '.'))
    {
        return Err(NameError::BadChar { name: owned(), ch });
    }
    if name.contains("..") {
        return Err(NameError::DotDot { name: owned() });
    }
    Ok(())
}

/// Why a definition file could not be used. The Display is one sentence that
/// names the file and, where there is one, the line and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("{}: cannot read the definition: {reason}", file.display())]
    Read { file: PathBuf, reason: String },
    #[error("{}: the file name does not give a valid machine name: {reason}", file.display())]
    Name { file: PathBuf, reason: NameError },
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}:{line}: key \"{key}\": {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// A required key is absent, so there is no line to point at.
    #[error("{}: key \"{key}\": {message}", file.display())]
    Missing {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl DefinitionError {
    pub fn file(&self) -> &Path {
        match self {
            DefinitionError::Read { file, .. }
            | DefinitionError::Name { file, .. }
            | DefinitionError::Syntax { file, .. }
            | DefinitionError::Invalid { file, .. }
            | DefinitionError::Missing { file, .. } => file,
        }
    }

    /// The 1-based line the error is about, when there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            DefinitionError::Syntax { line, .. } | DefinitionError::Invalid { line, .. } => {
                Some(*line)
            }
            _ => None,
        }
    }

    /// The dotted key the error is about, e.g. `network.ports`.
    pub fn key(&self) -> Option<&str> {
        match self {
            DefinitionError::Invalid { key, .. } | DefinitionError::Missing { key, .. } => {
                Some(key)
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Raw TOML shape
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    root: Option<Spanned<String>>,
    boot: Option<Spanned<bool>>,
    command: Option<Spanned<Vec<String>>>,
    hostname: Option<Spanned<String>>,
    autostart: Option<bool>,
    restart: Option<Spanned<String>>,
    environment: Option<Spanned<BTreeMap<String, String>>>,
    stop_timeout: Option<Spanned<toml::Value>>,
    stop_signal: Option<Spanned<toml::Value>>,
    notify_ready: Option<Spanned<String>>,
    read_only: Option<bool>,
    ephemeral: Option<bool>,
    users: Option<RawUsers>,
    network: Option<RawNetwork>,
    resources: Option<RawResources>,
    bind: Option<Vec<RawBind>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    base: Option<Spanned<toml::Value>>,
    size: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    nat: Option<bool>,
    ports: Option<Vec<Spanned<String>>>,
    bridge: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory: Option<Spanned<toml::Value>>,
    cpus: Option<Spanned<toml::Value>>,
    tasks: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBind {
    source: Spanned<String>,
    target: Spanned<String>,
    read_only: Option<bool>,
}

// ---------------------------------------------------------------------------
// Parsing and validation
// ---------------------------------------------------------------------------

/// The size of one user namespace block; ranges come in multiples of it.
pub const ID_BLOCK: u32 = 65536;

/// The file being parsed, to turn spans into `file:line: key "...":` errors.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid(
        &self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> DefinitionError {
        DefinitionError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line_of(span.start),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn spanned<T>(
        &self,
        value: &Spanned<T>,
        key: &str,
        message: impl Into<String>,
    ) -> DefinitionError {
        self.invalid(value.span(), key, message)
    }

    fn missing(&self, key: &str, message: impl Into<String>) -> DefinitionError {
        DefinitionError::Missing {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Turns a TOML error into ours. The deserializer knows the key but does
    /// not hand it out, so it is read back from the text around the span.
    fn from_toml(&self, error: &toml::de::Error) -> DefinitionError {
        let offset = error.span().map_or(0, |span| span.start);
        let line = self.line_of(offset);
        let message = error.message().trim().to_string();
        match key_at(self.text, offset) {
            Some(key) => DefinitionError::Invalid {
                file: self.file.to_path_buf(),
                line,
                key,
                message,
            },
            None => DefinitionError::Syntax {
                file: self.file.to_path_buf(),
                line,
                message,
            },
        }
    }
}

/// The dotted key whose line holds `offset`: the last `[table]` header before
/// it joined with the last `key =` at or before it. Only used to name keys in
/// errors the TOML deserializer reports, so best effort is enough.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let mut table: Option<String> = None;
    let mut key: Option<String> = None;
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        if line_start > offset {
            break;
        }
        line_start += line.len();
        let code = strip_comment(line).trim();
        if let Some(header) = code.strip_prefix('[') {
            let header = header.trim_start_matches('[').trim_end_matches(']').trim();
            table = Some(unquote_key(header));
            key = None;
        } else if let Some((left, _)) = code.split_once('=') {
            let left = left.trim();
            if !left.is_empty()
                && left
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c))
            {
                key = Some(unquote_key(left));
            }
        }
    }
    match (table, key) {
        (Some(table), Some(key)) => Some(format!("{table}.{key}")),
        (None, Some(key)) => Some(key),
        (Some(table), None) => Some(table),
        (None, None) => None,
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_string = None;
    for (i, c) in line.char_indices() {
        match (in_string, c) {
            (None, '#') => return &line[..i],
            (None, '"' | '\'') => in_string = Some(c),
            (Some(quote), _) if c == quote => in_string = None,
            _ => {}
        }
    }
    line
}

fn unquote_key(key: &str) -> String {
    key.split('.')
        .map(|part| part.trim().trim_matches('"').trim_matches('\''))
        .collect::<Vec<_>>()
        .join(".")
}

/// Parses and validates the text of `file`, the definition of machine `name`.
/// Does not look at the file system.
pub fn parse_definition(
    name: &str,
    file: &Path,
    text: &str,
) -> Result<Definition, DefinitionError> {
    parse_with_spans(name, file, text).map(|(definition, _)| definition)
}

/// Like [`parse_definition`], also returning the span of `root` for checks
/// made later against the file system.
fn parse_with_spans(
    name: &str,
    file: &Path,
    text: &str,
) -> Result<(Definition, Range<usize>), DefinitionError> {
    let src = Source { file, text };
    let raw: RawDefinition = toml::from_str(text).map_err(|e| src.from_toml(&e))?;

    let root_raw = raw.root.ok_or_else(|| {
        src.missing(
            "root",
            "is required: the directory holding the machine's OS tree",
        )
    })?;
    let root = absolute_path(&src, &root_raw, "root")?;
    if has_dotdot(&root) {
        return Err(src.spanned(
            &root_raw,
            "root",
            format!("{:?} must not contain \"..\"", root_raw.get_ref()),
        ));
    }

    let boot = raw.boot.as_ref().is_none_or(|b| *b.get_ref());
    let command = match (&raw.command, boot) {
        (Some(command), _) => {
            let argv = command.get_ref();
            let Some(program) = argv.first() else {
                return Err(src.spanned(command, "command", "must not be empty"));
            };
            if !program.starts_with('/') {
                return Err(src.spanned(
                    command,
                    "command",
                    format!("the program {program:?} must be an absolute path"),
                ));
            }
            if let Some(arg) = argv.iter().find(|arg| arg.contains('\0')) {
                return Err(src.spanned(
                    command,
                    "command",
                    format!("{arg:?} contains a NUL byte"),
                ));
            }
            argv.clone()
        }
        (None, true) => vec!["/sbin/init".to_string()],
        (None, false) => {
            let message = "is required when boot = false: the program to run as PID 1";
            return Err(match &raw.boot {
                Some(boot) => src.spanned(boot, "command", message),
                None => src.missing("command", message),
            });
        }
    };

    let hostname = match &raw.hostname {
        Some(hostname) => {
            check_hostname(hostname.get_ref()).map_err(|m| src.spanned(hostname, "hostname", m))?;
            hostname.get_ref().clone()
        }
        None => name.to_string(),
    };

    let restart = parse_word(&src, raw.restart.as_ref(), "restart", RestartPolicy::No)?;
    let notify_ready = parse_word(
        &src,
        raw.notify_ready.as_ref(),
        "notify_ready",
        NotifyReady::Auto,
    )?;

    let environment = match &raw.environment {
        Some(environment) => {
            for (key, value) in environment.get_ref() {
                let problem = if key.is_empty() {
                    Some("a variable name must not be empty".to_string())
                } else if key.contains('=') {
                    Some(format!("the variable name {key:?} must not contain \"=\""))
                } else if key.contains('\0') || value.contains('\0') {
                    Some(format!("the variable {key:?} contains a NUL byte"))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(src.spanned(environment, "environment", problem));
                }
            }
            environment.get_ref().clone()
        }
        None => BTreeMap::new(),
    };

    let stop_timeout = match &raw.stop_timeout {
        Some(value) => {
            let parsed = match value.get_ref() {
                toml::Value::Integer(seconds) => u64::try_from(*seconds)
                    .map(Duration::from_secs)
                    .map_err(|_| format!("{seconds} is negative")),
                toml::Value::String(text) => parse_duration(text),
                other => Err(format!(
                    "expected a duration like \"30s\", found a {}",
                    other.type_str()
                )),
            };
            parsed.map_err(|m| src.spanned(value, "stop_timeout", m))?
        }
        None => Duration::from_secs(30),
    };

    let stop_signal = match &raw.stop_signal {
        Some(value) => {
            let text = match value.get_ref() {
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::String(s) => s.clone(),
                other => {
                    return Err(src.spanned(
                        value,
                        "stop_signal",
                        format!(
                            "expected a signal name or number, found a {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            text.parse::<StopSignal>()
                .map_err(|m| src.spanned(value, "stop_signal", m))?
        }
        None => StopSignal::Auto,
    };

    let users = parse_users(&src, raw.users.as_ref())?;
    let network = parse_network(&src, raw.network.as_ref())?;
    let resources = parse_resources(&src, raw.resources.as_ref())?;
    let binds = raw
        .bind
        .iter()
        .flatten()
        .map(|bind| parse_bind(&src, bind))
        .collect::<Result<Vec<_>, _>>()?;

    let definition = Definition {
        name: name.to_string(),
        file: file.to_path_buf(),
        root,
        boot,
        command,
        hostname,
        autostart: raw.autostart.unwrap_or(false),
        restart,
        environment,
        stop_timeout,
        stop_signal,
        notify_ready,
        read_only: raw.read_only.unwrap_or(false),
        ephemeral: raw.ephemeral.unwrap_or(false),
        users,
        network,
        resources,
        binds,
    };
    Ok((definition, root_raw.span()))
}

fn parse_word<T: FromStr<Err = String>>(
    src: &Source<'_>,
    value: Option<&Spanned<String>>,
    key: &str,
    default: T,
) -> Result<T, DefinitionError> {
    match value {
        Some(value) => value
            .get_ref()
            .parse()
            .map_err(|m| src.spanned(value, key, m)),
        None => Ok(default),
    }
}

fn absolute_path(
    src: &Source<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<PathBuf, DefinitionError> {
    let text = value.get_ref();
    if !text.starts_with('/') {
        return Err(src.spanned(value, key, format!("{text:?} must be an absolute path")));
    }
    if text.contains('\0') {
        return Err(src.spanned(value, key, format!("{text:?} contains a NUL byte")));
    }
    Ok(PathBuf::from(text))
}

fn has_dotdot(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

fn check_hostname(hostname: &str) -> Result<(), String> {
    if hostname.is_empty() || hostname.len() > 64 {
        return Err(format!("{hostname:?} must be 1 to 64 characters long"));
    }
    for label in hostname.split('.') {
        if label.is_empty() {
            return Err(format!("{hostname:?} has an empty label"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "{hostname:?} contains {c:?}; labels hold only letters, digits and \"-\""
            ));
        }
    }
    Ok(())
}

/// `"30s"`, `"500ms"`, `"2min"`, `"1h"`, `"1min 30s"` or plain seconds `"30"`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{text:?} is not a duration; expected e.g. \"30s\", \"500ms\", \"2min\", \"1h\" or seconds")
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad());
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total_ms: u64 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let per_unit_ms: u64 = match &rest[..unit_len] {
            "ms" | "msec" => 1,
            "s" | "sec" => 1000,
            "m" | "min" => 60_000,
            "h" | "hr" => 3_600_000,
            _ => return Err(bad()),
        };
        rest = rest[unit_len..].trim_start();
        total_ms = number
            .checked_mul(per_unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("{text:?} is too long"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// `"512M"`, `"2G"`, `"1024K"`, `"1T"` (powers of 1024) or plain bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let bad =
        || format!("{text:?} is not a size; expected e.g. \"512M\", \"2G\", \"1024K\" or bytes");
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.chars().last() {
        Some('K' | 'k') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M' | 'm') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G' | 'g') => (&trimmed[..trimmed.len() - 1], 30),
        Some('T' | 't') => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_users(src: &Source<'_>, raw: Option<&RawUsers>) -> Result<Users, DefinitionError> {
    let size = match raw.and_then(|r| r.size.as_ref()) {
        Some(size) => {
            let value = *size.get_ref();
            let max = 16 * i64::from(ID_BLOCK);
            if value < i64::from(ID_BLOCK) || value > max || value % i64::from(ID_BLOCK) != 0 {
                return Err(src.spanned(
                    size,
                    "users.size",
                    format!("{value} must be a multiple of 65536 between 65536 and {max}"),
                ));
            }
            // In range by the check above.
            u32::try_from(value).map_err(|_| src.spanned(size, "users.size", "is too large"))?
        }
        None => ID_BLOCK,
    };
    let base = match raw.and_then(|r| r.base.as_ref()) {
        Some(base) => match base.get_ref() {
            toml::Value::String(s) if s == "pick" => UidBase::Pick,
            toml::Value::Integer(n) => {
                let n = *n;
                let fits = u32::try_from(n)
                    .ok()
                    .filter(|b| u64::from(*b) + u64::from(size) <= u64::from(u32::MAX));
                match fits {
                    Some(b) if b > 0 && b % ID_BLOCK == 0 => UidBase::Fixed(b),
                    Some(_) => {
                        return Err(src.spanned(
                            base,
                            "users.base",
                            format!("{n} must be a multiple of 65536 greater than 0"),
                        ))
                    }
                    None => {
                        return Err(src.spanned(
                            base,
                            "users.base",
                            format!("{n} with size {size} does not fit in the host's uid space"),
                        ))
                    }
                }
            }
            other => return Err(src.spanned(
                base,
                "users.base",
                format!(
                    "expected \"pick\" or a host uid that is a multiple of 65536, found {other}"
                ),
            )),
        },
        None => UidBase::Pick,
    };
    Ok(Users { base, size })
}

fn parse_network(src: &Source<'_>, raw: Option<&RawNetwork>) -> Result<Network, DefinitionError> {
    let mode = parse_word(
        src,
        raw.and_then(|r| r.mode.as_ref()),
        "network.mode",
        NetworkMode::Private,
    )?;
    let address = match raw.and_then(|r| r.address.as_ref()) {
        Some(address) if address.get_ref() == "auto" => AddressSpec::Auto,
        Some(address) => {
            let (ip, prefix) = parse_cidr(address.get_ref())
                .map_err(|m| src.spanned(address, "network.address", m))?;
            if mode == NetworkMode::None {
                return Err(src.spanned(
                    address,
                    "network.address",
                    "a machine with mode = \"none\" has no network address to set",
                ));
            }
            AddressSpec::Cidr(ip, prefix)
        }
        None => AddressSpec::Auto,
    };
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for port in raw.and_then(|r| r.ports.as_ref()).into_iter().flatten() {
        let spec = parse_port(port.get_ref()).map_err(|m| src.spanned(port, "network.ports", m))?;
        if mode == NetworkMode::None {
            return Err(src.spanned(
                port,
                "network.ports",
                "a machine with mode = \"none\" cannot forward ports",
            ));
        }
        if !seen.insert((spec.protocol.as_str(), spec.host_port)) {
            return Err(src.spanned(
                port,
                "network.ports",
                format!(
                    "{:?}: host port {}/{} is forwarded twice",
                    port.get_ref(),
                    spec.host_port,
                    spec.protocol
                ),
            ));
        }
        ports.push(spec);
    }
    let bridge = match raw.and_then(|r| r.bridge.as_ref()) {
        Some(bridge) => {
            let name = bridge.get_ref();
            let bad = name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
            if bad {
                return Err(src.spanned(
                    bridge,
                    "network.bridge",
                    format!("{name:?} is not a network interface name (at most 15 characters, no \"/\", \":\" or spaces)"),
                ));
            }
            name.clone()
        }
        None => String::new(),
    };
    Ok(Network {
        mode,
        address,
        nat: raw.and_then(|r| r.nat).unwrap_or(true),
        ports,
        bridge,
    })
}

/// `"192.0.2.10/24"` or `"fd00::10/64"`, a host address inside its prefix.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let Some((addr, prefix)) = text.split_once('/') else {
        return Err(format!(
            "{text:?} is not \"auto\" or an address with a prefix length like \"192.0.2.10/24\""
        ));
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?}: {addr:?} is not an IPv4 or IPv6 address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("{text:?}: the prefix length must be a number 0-{max}"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{text:?}: {ip} cannot be a machine's address"));
    }
    if let IpAddr::V4(v4) = ip {
        if prefix < 31 {
            let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            let host = u32::from(v4) & host_mask;
            if host == 0 {
                return Err(format!(
                    "{text:?} is the network address of its subnet, not a host address"
                ));
            }
            if host == host_mask {
                return Err(format!(
                    "{text:?} is the broadcast address of its subnet, not a host address"
                ));
            }
        }
    }
    Ok((ip, prefix))
}

/// `"tcp:8080:80"`: protocol, host port, machine port.
fn parse_port(text: &str) -> Result<PortSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [protocol, host, machine] = parts[..] else {
        return Err(format!(
            "{text:?} is not protocol:host_port:machine_port, e.g. \"tcp:8080:80\""
        ));
    };
    let protocol: Protocol = protocol.parse().map_err(|m| format!("{text:?}: {m}"))?;
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u64>() {
            Ok(n @ 1..=65535) => {
                u16::try_from(n).map_err(|_| format!("{text:?}: port {n} is out of range 1-65535"))
            }
            Ok(n) => Err(format!("{text:?}: port {n} is out of range 1-65535")),
            Err(_) => Err(format!("{text:?}: {p:?} is not a port number")),
        }
    };
    Ok(PortSpec {
        protocol,
        host_port: port(host)?,
        machine_port: port(machine)?,
    })
}

fn parse_resources(
    src: &Source<'_>,
    raw: Option<&RawResources>,
) -> Result<Resources, DefinitionError> {
    let Some(raw) = raw else {
        return Ok(Resources::default());
    };
    let memory = match &raw.memory {
        Some(value) => {
            let bytes = match value.get_ref() {
                toml::Value::Integer(n) => {
                    u64::try_from(*n).map_err(|_| format!("{n} is negative"))
                }
                toml::Value::String(s) => parse_size(s),
                other => Err(format!(
                    "expected a size like \"512M\", found a {}",
                    other.type_str()
                )),
            }
            .and_then(|b| {
                if b == 0 {
                    Err("must be greater than 0".to_string())
                } else {
                    Ok(b)
                }
            })
            .map_err(|m| src.spanned(value, "resources.memory", m))?;
            Some(bytes)
        }
        None => None,
    };
    let cpus = match &raw.cpus {
        Some(value) => {
            let cpus = match value.get_ref() {
                // Any i64 of interest is exact in an f64; out-of-range ones are rejected below.
                #[allow(clippy::cast_precision_loss)]
                toml::Value::Integer(n) => *n as f64,
                toml::Value::Float(f) => *f,
                other => {
                    return Err(src.spanned(
                        value,
                        "resources.cpus",
                        format!("expected a number like 1.5, found a {}", other.type_str()),
                    ))
                }
            };
            if !(cpus > 0.0 && cpus <= 1024.0) {
                return Err(src.spanned(
                    value,
                    "resources.cpus",
                    format!("{cpus} must be greater than 0 and at most 1024"),
                ));
            }
            Some(cpus)
        }
        None => None,
    };
    let tasks = match &raw.tasks {
        Some(value) => {
            let n = *value.get_ref();
            let tasks = u64::try_from(n).ok().filter(|t| *t >= 1).ok_or_else(|| {
                src.spanned(value, "resources.tasks", format!("{n} must be at least 1"))
            })?;
            Some(tasks)
        }
        None => None,
    };
    Ok(Resources {
        memory,
        cpus,
        tasks,
    })
}

fn parse_bind(src: &Source<'_>, raw: &RawBind) -> Result<Bind, DefinitionError> {
    let source = absolute_path(src, &raw.source, "bind.source")?;
    let target = absolute_path(src, &raw.target, "bind.target")?;
    if target == Path::new("/") {
        return Err(src.spanned(
            &raw.target,
            "bind.target",
            "must not be \"/\"; the root is set by \"root\"",
        ));
    }
    if has_dotdot(&target) {
        return Err(src.spanned(
            &raw.target,
            "bind.target",
            format!("{:?} must not contain \"..\"", raw.target.get_ref()),
        ));
    }
    Ok(Bind {
        source,
        target,
        read_only: raw.read_only.unwrap_or(false),
    })
}

// ---------------------------------------------------------------------------
// Loading from disk
// ---------------------------------------------------------------------------

/// Reads, parses and validates `file`; the machine's name is the file stem.
/// Also checks that `root` is a directory. Whether it holds an init is left
/// to start time.
pub fn load_definition(file: &Path) -> Result<Definition, DefinitionError> {
    let name = name_of(file);
    validate_name(&name).map_err(|reason| DefinitionError::Name {
        file: file.to_path_buf(),
        reason,
    })?;
    let text = std::fs::read_to_string(file).map_err(|e| DefinitionError::Read {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (definition, root_span) = parse_with_spans(&name, file, &text)?;
    let src = Source { file, text: &text };
    match std::fs::metadata(&definition.root) {
        Ok(meta) if meta.is_dir() => Ok(definition),
        Ok(_) => Err(src.invalid(
            root_span,
            "root",
            format!("{} is not a directory", definition.root.display()),
        )),
        Err(e) => Err(src.invalid(
            root_span,
            "root",
            format!("{}: {e}", definition.root.display()),
        )),
    }
}

fn name_of(file: &Path) -> String {
    file.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One `*.toml` file of the definitions directory, good or not.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedDefinition {
    pub name: String,
    pub file: PathBuf,
    pub result: Result<Definition, DefinitionError>,
}

/// Loads every `*.toml` in `dir` (not recursively), sorted by file name. A
/// bad file is returned with its error; it never stops the others. Fails only
/// when the directory itself cannot be read.
pub fn load_dir(dir: &Path) -> std::io::Result<Vec<LoadedDefinition>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|file| LoadedDefinition {
            name: name_of(&file),
            result: load_definition(&file),
            file,
        })
        .collect())
}
