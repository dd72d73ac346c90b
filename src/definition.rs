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
    /// The OS tree; for `image = "NAME"`, the image's tree in the store
    /// (filled in by [`load_definition`]), the lower layer of an overlay.
    pub root: PathBuf,
    /// `image = "NAME"`: the machine's root is an overlay on this image.
    #[serde(default)]
    pub image: Option<String>,
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
    /// `user = "UID:GID"`: the command runs as this user of the machine
    /// (the default of an OCI image's `User`); None: root.
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// `working_directory = "/path"`: the command starts there.
    #[serde(default)]
    pub working_directory: Option<PathBuf>,
    pub users: Users,
    pub network: Network,
    pub resources: Resources,
    pub binds: Vec<Bind>,
    /// Host device nodes (`[devices] allow`) the machine may open besides
    /// its default /dev: bound at the same path and let through the
    /// machine's device policy.
    #[serde(default)]
    pub devices: Vec<PathBuf>,
    /// `allow_exposed_root`: boot even when unprivileged host users can
    /// reach the root (its setuid files would be theirs to run).
    #[serde(default)]
    pub allow_exposed_root: bool,
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
    /// What the machine may reach (docs/networking.md).
    pub reach: Reach,
    /// No traffic to or from the other machines (except published ports).
    pub isolated: bool,
}

/// What a private machine may reach through the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Reach {
    /// Everything the host routes to, the host's services and the other
    /// machines (the host's loopback never).
    #[default]
    All,
    /// Networks outside the host only: not the host's own addresses
    /// (ICMP aside), not the other machines.
    Outside,
    /// Nothing: the machine opens no connection; only its published
    /// ports are reachable.
    Nothing,
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
    /// Hard memory limit, bytes.
    pub memory: Option<u64>,
    /// Memory throttle threshold, bytes.
    #[serde(default)]
    pub memory_high: Option<u64>,
    /// CPU bandwidth in CPUs, e.g. 1.5.
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1..=10000 (100 is the default).
    #[serde(default)]
    pub cpu_weight: Option<u16>,
    /// Most tasks (processes and threads).
    pub tasks: Option<u64>,
    /// Relative I/O weight, 1..=10000 (100 is the default).
    #[serde(default)]
    pub io_weight: Option<u16>,
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

impl Reach {
    pub const ALL: [Reach; 3] = [Reach::All, Reach::Outside, Reach::Nothing];

    pub fn as_str(self) -> &'static str {
        match self {
            Reach::All => "all",
            Reach::Outside => "outside",
            Reach::Nothing => "nothing",
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
word_enum_strings!(Reach, "network reach");

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
    // The text after "RTMIN+" / "RTMAX-": one or more digits.
    let rt_offset = |rest: &str| -> Option<i32> {
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()
    };
    let number = if let Some(rest) = bare.strip_prefix("RTMIN") {
        match rest.strip_prefix('+') {
            Some(offset) => rtmin.checked_add(rt_offset(offset)?)?,
            None if rest.is_empty() => rtmin,
            None => return None,
        }
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        match rest.strip_prefix('-') {
            Some(offset) => rtmax.checked_sub(rt_offset(offset)?)?,
            None if rest.is_empty() => rtmax,
            None => return None,
        }
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

/// Checks an image name: the same rule as a machine name.
pub fn validate_image_name(name: &str) -> Result<(), String> {
    validate_name(name).map_err(|e| e.to_string().replace("machine name", "image name"))
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
    image: Option<Spanned<String>>,
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
    user: Option<Spanned<String>>,
    working_directory: Option<Spanned<String>>,
    users: Option<RawUsers>,
    network: Option<RawNetwork>,
    resources: Option<RawResources>,
    bind: Option<Vec<RawBind>>,
    devices: Option<RawDevices>,
    allow_exposed_root: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevices {
    allow: Option<Vec<Spanned<String>>>,
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
    reach: Option<Spanned<String>>,
    isolated: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory: Option<Spanned<toml::Value>>,
    memory_high: Option<Spanned<toml::Value>>,
    cpus: Option<Spanned<toml::Value>>,
    cpu_weight: Option<Spanned<i64>>,
    tasks: Option<Spanned<i64>>,
    io_weight: Option<Spanned<i64>>,
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
    fn toml_error(&self, error: &toml::de::Error) -> DefinitionError {
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
    let raw: RawDefinition = toml::from_str(text).map_err(|e| src.toml_error(&e))?;

    let (root, image, root_span) = match (&raw.root, &raw.image) {
        (Some(_), Some(image)) => {
            return Err(src.spanned(
                image,
                "image",
                "a definition names either root or image, not both",
            ))
        }
        (None, None) => {
            return Err(src.missing(
                "root",
                "is required: the directory holding the machine's OS tree \
                 (or set `image` to an imported image)",
            ))
        }
        (Some(root_raw), None) => {
            let root = absolute_path(&src, root_raw, "root")?;
            if has_dotdot(&root) {
                return Err(src.spanned(
                    root_raw,
                    "root",
                    format!("{:?} must not contain \"..\"", root_raw.get_ref()),
                ));
            }
            (root, None, root_raw.span())
        }
        (None, Some(image)) => {
            validate_image_name(image.get_ref()).map_err(|m| src.spanned(image, "image", m))?;
            (PathBuf::new(), Some(image.get_ref().clone()), image.span())
        }
    };

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

    let user = match &raw.user {
        Some(user) => Some(parse_user(user.get_ref()).map_err(|m| src.spanned(user, "user", m))?),
        None => None,
    };
    let working_directory = match &raw.working_directory {
        Some(dir) => Some(absolute_path(&src, dir, "working_directory")?),
        None => None,
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
    let devices = raw
        .devices
        .iter()
        .flat_map(|d| d.allow.iter().flatten())
        .map(|path| parse_device(&src, path))
        .collect::<Result<Vec<_>, _>>()?;

    let definition = Definition {
        name: name.to_string(),
        file: file.to_path_buf(),
        root,
        image,
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
        user,
        working_directory,
        users,
        network,
        resources,
        binds,
        devices,
        allow_exposed_root: raw.allow_exposed_root.unwrap_or(false),
    };
    Ok((definition, root_span))
}

/// `UID:GID` (numbers; a name would need the guest's files at parse time).
fn parse_user(text: &str) -> Result<(u32, u32), String> {
    let bad =
        || format!("{text:?} is not a user; expected \"UID:GID\" in numbers, e.g. \"1000:1000\"");
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((
        uid.parse().map_err(|_| bad())?,
        gid.parse().map_err(|_| bad())?,
    ))
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
            other => {
                return Err(src.spanned(
                    base,
                    "users.base",
                    format!(
                    "expected \"pick\" or a host uid that is a multiple of 65536, found {other}"
                ),
                ))
            }
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
    let (reach, isolated) = parse_isolation(src, raw, mode)?;
    Ok(Network {
        mode,
        address,
        nat: raw.and_then(|r| r.nat).unwrap_or(true),
        ports,
        bridge,
        reach,
        isolated,
    })
}

/// `network.reach` and `network.isolated`: only for private machines.
fn parse_isolation(
    src: &Source<'_>,
    raw: Option<&RawNetwork>,
    mode: NetworkMode,
) -> Result<(Reach, bool), DefinitionError> {
    let reach_raw = raw.and_then(|r| r.reach.as_ref());
    let reach = parse_word(src, reach_raw, "network.reach", Reach::All)?;
    let isolated_raw = raw.and_then(|r| r.isolated.as_ref());
    if mode == NetworkMode::None {
        if let Some(value) = reach_raw {
            return Err(src.spanned(
                value,
                "network.reach",
                "a machine with mode = \"none\" reaches nothing anyway; remove the key",
            ));
        }
        if let Some(value) = isolated_raw {
            return Err(src.spanned(
                value,
                "network.isolated",
                "a machine with mode = \"none\" is isolated anyway; remove the key",
            ));
        }
    }
    Ok((reach, isolated_raw.is_some_and(|v| *v.get_ref())))
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
    let memory = parse_memory(src, raw.memory.as_ref(), "resources.memory")?;
    let memory_high = parse_memory(src, raw.memory_high.as_ref(), "resources.memory_high")?;
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
        memory_high,
        cpus,
        cpu_weight: parse_weight(src, raw.cpu_weight.as_ref(), "resources.cpu_weight")?,
        tasks,
        io_weight: parse_weight(src, raw.io_weight.as_ref(), "resources.io_weight")?,
    })
}

/// A size in bytes: an integer or a string like "512M".
fn parse_memory(
    src: &Source<'_>,
    value: Option<&Spanned<toml::Value>>,
    key: &str,
) -> Result<Option<u64>, DefinitionError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bytes = match value.get_ref() {
        toml::Value::Integer(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
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
    .map_err(|m| src.spanned(value, key, m))?;
    Ok(Some(bytes))
}

/// A relative weight, 1..=10000 as in cgroup2's cpu.weight and io.weight.
fn parse_weight(
    src: &Source<'_>,
    value: Option<&Spanned<i64>>,
    key: &str,
) -> Result<Option<u16>, DefinitionError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let n = *value.get_ref();
    u16::try_from(n)
        .ok()
        .filter(|w| (1..=10_000).contains(w))
        .map(Some)
        .ok_or_else(|| src.spanned(value, key, format!("{n} must be between 1 and 10000")))
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

/// A `[devices] allow` entry: a device path under /dev, kept as written.
fn parse_device(src: &Source<'_>, raw: &Spanned<String>) -> Result<PathBuf, DefinitionError> {
    let path = absolute_path(src, raw, "devices.allow")?;
    let under_dev = path
        .strip_prefix("/dev")
        .is_ok_and(|rest| !rest.as_os_str().is_empty());
    if !under_dev || has_dotdot(&path) || raw.get_ref().contains("//") {
        return Err(src.spanned(
            raw,
            "devices.allow",
            format!(
                "{:?} must be a device path under /dev, e.g. \"/dev/fuse\"",
                raw.get_ref()
            ),
        ));
    }
    if path.starts_with("/dev/pts") || path == Path::new("/dev/console") {
        return Err(src.spanned(
            raw,
            "devices.allow",
            format!(
                "{:?} is the machine's own; it cannot be allowed from the host",
                raw.get_ref()
            ),
        ));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// Loading from disk
// ---------------------------------------------------------------------------

/// Reads, parses and validates `file`; the machine's name is the file stem.
/// Also checks that `root` is a directory, or for `image = "NAME"` that
/// `<images>/NAME` is one (and makes it the root). Whether it holds an init
/// is left to start time.
pub fn load_definition(file: &Path, images: &Path) -> Result<Definition, DefinitionError> {
    let name = name_of(file);
    validate_name(&name).map_err(|reason| DefinitionError::Name {
        file: file.to_path_buf(),
        reason,
    })?;
    let text = std::fs::read_to_string(file).map_err(|e| DefinitionError::Read {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (mut definition, root_span) = parse_with_spans(&name, file, &text)?;
    let src = Source { file, text: &text };
    if let Some(image) = &definition.image {
        let tree = images.join(image);
        if !tree.is_dir() {
            return Err(src.invalid(
                root_span,
                "image",
                format!(
                    "no image {image:?} is imported ({} is missing); import it with \
                     `rmachinectl image import {image} FILE`",
                    tree.display()
                ),
            ));
        }
        definition.root = tree;
        return Ok(definition);
    }
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
/// when the directory itself cannot be read. `images` is where `image = ...`
/// names are looked up.
pub fn load_dir(dir: &Path, images: &Path) -> std::io::Result<Vec<LoadedDefinition>> {
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
            result: load_definition(&file, images),
            file,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const FILE: &str = "/etc/rmachines/web.toml";

    fn parse(text: &str) -> Result<Definition, DefinitionError> {
        parse_definition("web", Path::new(FILE), text)
    }

    /// Parses `text`, expects an error and checks it names the file, `line` and `key`.
    #[track_caller]
    fn expect_error(text: &str, line: usize, key: &str) -> String {
        let err = parse(text).expect_err("definition should be rejected");
        let message = err.to_string();
        assert_eq!(err.line(), Some(line), "{message}");
        assert_eq!(err.key(), Some(key), "{message}");
        assert!(
            message.starts_with(&format!("{FILE}:{line}: key \"{key}\": ")),
            "{message}"
        );
        message
    }

    fn with_root(rest: &str) -> String {
        format!("root = \"/var/lib/machines/web\"\n{rest}")
    }

    #[test]
    fn minimal_definition_gets_defaults() {
        let def = parse(&with_root("")).unwrap();
        assert_eq!(def.name, "web");
        assert_eq!(def.file, PathBuf::from(FILE));
        assert_eq!(def.root, PathBuf::from("/var/lib/machines/web"));
        assert!(def.boot);
        assert_eq!(def.command, vec!["/sbin/init"]);
        assert_eq!(def.hostname, "web");
        assert!(!def.autostart);
        assert_eq!(def.restart, RestartPolicy::No);
        assert!(def.environment.is_empty());
        assert_eq!(def.stop_timeout, Duration::from_secs(30));
        assert_eq!(def.stop_signal, StopSignal::Auto);
        assert_eq!(def.notify_ready, NotifyReady::Auto);
        assert!(!def.read_only);
        assert!(!def.ephemeral);
        assert_eq!(
            def.users,
            Users {
                base: UidBase::Pick,
                size: 65536
            }
        );
        assert_eq!(
            def.network,
            Network {
                mode: NetworkMode::Private,
                address: AddressSpec::Auto,
                nat: true,
                ports: vec![],
                bridge: String::new(),
                reach: Reach::All,
                isolated: false,
            }
        );
        assert_eq!(def.resources, Resources::default());
        assert!(def.binds.is_empty());
    }

    const SPEC_EXAMPLE: &str = r#"root = "/var/lib/machines/web"   # required: a directory holding an OS tree
boot = true                      # default true: run init as PID 1
command = ["/sbin/init"]         # default ["/sbin/init"] when boot = true
hostname = "web"                 # default: the machine name
autostart = false                # started when rmachined starts
restart = "no"                   # no | on-failure | always
environment = { LANG = "C.UTF-8" }
stop_timeout = "30s"             # then SIGKILL
stop_signal = "auto"             # auto: SIGRTMIN+3 for systemd, what the init understands otherwise
notify_ready = "auto"            # auto | yes | no  (auto: yes when init is systemd)
read_only = false                # root mounted read-only
ephemeral = false                # writable overlay discarded at stop

[users]                          # user namespace: always on
base = "pick"                    # "pick" or a fixed host uid (multiple of 65536)
size = 65536

[network]
mode = "private"                 # private (veth to host) | none (loopback only)
address = "auto"                 # or "CIDR", e.g. "192.0.2.10/24"
nat = true                       # masquerade outbound traffic
ports = ["tcp:8080:80"]          # proto:host_port:machine_port
bridge = ""                      # attach host side to this bridge instead

[resources]
memory = "512M"
cpus = 1.5
tasks = 512

[[bind]]
source = "/srv/web"
target = "/srv/web"
read_only = false
"#;

    #[test]
    fn spec_example_parses() {
        let def = parse(SPEC_EXAMPLE).unwrap();
        let expected = Definition {
            name: "web".into(),
            file: PathBuf::from(FILE),
            root: PathBuf::from("/var/lib/machines/web"),
            image: None,
            boot: true,
            command: vec!["/sbin/init".into()],
            hostname: "web".into(),
            autostart: false,
            restart: RestartPolicy::No,
            environment: BTreeMap::from([("LANG".to_string(), "C.UTF-8".to_string())]),
            stop_timeout: Duration::from_secs(30),
            stop_signal: StopSignal::Auto,
            notify_ready: NotifyReady::Auto,
            read_only: false,
            ephemeral: false,
            user: None,
            working_directory: None,
            users: Users {
                base: UidBase::Pick,
                size: 65536,
            },
            network: Network {
                mode: NetworkMode::Private,
                address: AddressSpec::Auto,
                nat: true,
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    host_port: 8080,
                    machine_port: 80,
                }],
                bridge: String::new(),
                reach: Reach::All,
                isolated: false,
            },
            resources: Resources {
                memory: Some(512 << 20),
                cpus: Some(1.5),
                tasks: Some(512),
                ..Resources::default()
            },
            devices: Vec::new(),
            allow_exposed_root: false,
            binds: vec![Bind {
                source: "/srv/web".into(),
                target: "/srv/web".into(),
                read_only: false,
            }],
        };
        assert_eq!(def, expected);
    }

    #[test]
    fn explicit_values_parse() {
        let def = parse(&with_root(
            r#"boot = false
command = ["/bin/sh", "-c", "sleep 1"]
hostname = "Web-1.example"
autostart = true
restart = "on-failure"
stop_timeout = "1min 30s"
stop_signal = "RTMIN+4"
notify_ready = "yes"
[users]
base = 524288
size = 131072
[network]
mode = "private"
address = "192.0.2.10/24"
nat = false
ports = ["udp:53:53", "tcp:53:53"]
bridge = "br0"
[resources]
memory = 1048576
cpus = 2
"#,
        ))
        .unwrap();
        assert!(!def.boot);
        assert_eq!(def.command, vec!["/bin/sh", "-c", "sleep 1"]);
        assert_eq!(def.hostname, "Web-1.example");
        assert_eq!(def.restart, RestartPolicy::OnFailure);
        assert_eq!(def.stop_timeout, Duration::from_secs(90));
        assert_eq!(def.stop_signal, StopSignal::Signal(libc::SIGRTMIN() + 4));
        assert_eq!(def.notify_ready, NotifyReady::Yes);
        assert_eq!(
            def.users,
            Users {
                base: UidBase::Fixed(524288),
                size: 131072
            }
        );
        assert_eq!(
            def.network.address,
            AddressSpec::Cidr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 24)
        );
        assert!(!def.network.nat);
        assert_eq!(def.network.ports.len(), 2);
        assert_eq!(def.network.bridge, "br0");
        assert_eq!(def.resources.memory, Some(1048576));
        assert_eq!(def.resources.cpus, Some(2.0));
        assert_eq!(def.resources.tasks, None);
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse(&with_root("boot = \n")).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with(&format!("{FILE}:2: ")), "{message}");
        assert_eq!(err.line(), Some(2));

        let err = parse(&with_root("\n\n[network\nmode = \"none\"\n")).unwrap_err();
        assert_eq!(err.line(), Some(4), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        expect_error(&with_root("\nbooot = true\n"), 3, "booot");
        expect_error(
            &with_root("[network]\nmode = \"private\"\nnatt = true\n"),
            4,
            "network.natt",
        );
        expect_error(
            &with_root("[[bind]]\nsource = \"/a\"\ntarget = \"/b\"\nro = true\n"),
            5,
            "bind.ro",
        );
    }

    #[test]
    fn unknown_table_is_rejected() {
        let err = parse(&with_root("[netwrk]\nmode = \"none\"\n")).unwrap_err();
        assert_eq!(err.line(), Some(2), "{err}");
        assert!(err.to_string().contains("netwrk"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        expect_error(&with_root("boot = \"yes\"\n"), 2, "boot");
        expect_error(&with_root("command = \"/sbin/init\"\n"), 2, "command");
        expect_error(&with_root("[network]\nnat = 1\n"), 3, "network.nat");
        expect_error(
            &with_root("[resources]\ntasks = \"many\"\n"),
            3,
            "resources.tasks",
        );
        expect_error("root = 5\n", 1, "root");
    }

    #[test]
    fn root_errors() {
        let err = parse("boot = true\n").unwrap_err();
        assert_eq!(err.key(), Some("root"));
        assert!(
            err.to_string()
                .starts_with(&format!("{FILE}: key \"root\": ")),
            "{err}"
        );
        expect_error("\nroot = \"var/lib/machines/web\"\n", 2, "root");
        expect_error("root = \"/var/lib/../web\"\n", 1, "root");
    }

    #[test]
    fn bad_values_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("restart = \"sometimes\"", "restart"),
            ("stop_timeout = \"30 parsecs\"", "stop_timeout"),
            ("stop_timeout = \"s\"", "stop_timeout"),
            ("stop_timeout = -1", "stop_timeout"),
            ("stop_signal = \"SIGFOO\"", "stop_signal"),
            ("stop_signal = \"RTMIN+99\"", "stop_signal"),
            ("stop_signal = 0", "stop_signal"),
            ("stop_signal = 65", "stop_signal"),
            ("notify_ready = \"maybe\"", "notify_ready"),
            ("hostname = \"bad_host\"", "hostname"),
            ("hostname = \"a..b\"", "hostname"),
            ("hostname = \"\"", "hostname"),
            ("command = []", "command"),
            ("command = [\"sbin/init\"]", "command"),
            ("environment = { \"\" = \"x\" }", "environment"),
            ("environment = { \"A=B\" = \"x\" }", "environment"),
            ("environment = { \"A\\u0000\" = \"x\" }", "environment"),
        ];
        for (line, key) in cases {
            let message = expect_error(&with_root(line), 2, key);
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn command_is_required_without_boot() {
        expect_error(&with_root("boot = false\n"), 2, "command");
    }

    #[test]
    fn bad_users_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("base = \"choose\"", "users.base"),
            ("base = 0", "users.base"),
            ("base = 1000", "users.base"),
            ("base = -65536", "users.base"),
            ("base = 4294901760", "users.base"),
            ("size = 1000", "users.size"),
            ("size = 0", "users.size"),
            ("size = 2162688", "users.size"),
        ];
        for (line, key) in cases {
            expect_error(&with_root(&format!("[users]\n{line}\n")), 3, key);
        }
    }

    #[test]
    fn bad_network_is_rejected() {
        let cases: &[(&str, &str, &str)] = &[
            ("mode = \"bridged\"", "network.mode", "bridged"),
            ("address = \"192.0.2.10\"", "network.address", "prefix"),
            (
                "address = \"192.0.2.300/24\"",
                "network.address",
                "192.0.2.300",
            ),
            ("address = \"192.0.2.10/33\"", "network.address", "0-32"),
            ("address = \"fd00::1/129\"", "network.address", "0-128"),
            (
                "address = \"192.0.2.0/24\"",
                "network.address",
                "network address",
            ),
            (
                "address = \"192.0.2.255/24\"",
                "network.address",
                "broadcast",
            ),
            (
                "ports = [\"tcp:99999:80\"]",
                "network.ports",
                "port 99999 is out of range 1-65535",
            ),
            ("ports = [\"tcp:0:80\"]", "network.ports", "out of range"),
            ("ports = [\"sctp:80:80\"]", "network.ports", "sctp"),
            (
                "ports = [\"tcp:80\"]",
                "network.ports",
                "protocol:host_port",
            ),
            ("ports = [\"tcp:x:80\"]", "network.ports", "not a port"),
            ("bridge = \"a/b\"", "network.bridge", "interface"),
            ("reach = \"lan\"", "network.reach", "all, outside, nothing"),
            ("isolated = \"yes\"", "network.isolated", "bool"),
        ];
        for (line, key, needle) in cases {
            let message = expect_error(&with_root(&format!("[network]\n{line}\n")), 3, key);
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn example_port_error_reads_as_documented() {
        let message = expect_error(
            &with_root("[network]\nports = [\"tcp:99999:80\"]\n"),
            3,
            "network.ports",
        );
        assert_eq!(
            message,
            format!("{FILE}:3: key \"network.ports\": \"tcp:99999:80\": port 99999 is out of range 1-65535")
        );
    }

    #[test]
    fn duplicate_ports_are_rejected() {
        let text = with_root(
            "[network]\nports = [\n  \"tcp:80:80\",\n  \"udp:80:80\",\n  \"tcp:80:8080\",\n]\n",
        );
        let message = expect_error(&text, 6, "network.ports");
        assert!(message.contains("twice"), "{message}");
    }

    #[test]
    fn mode_none_excludes_ports_and_address() {
        expect_error(
            &with_root("[network]\nmode = \"none\"\nports = [\"tcp:80:80\"]\n"),
            4,
            "network.ports",
        );
        expect_error(
            &with_root("[network]\nmode = \"none\"\naddress = \"192.0.2.1/24\"\n"),
            4,
            "network.address",
        );
        let def = parse(&with_root(
            "[network]\nmode = \"none\"\naddress = \"auto\"\n",
        ))
        .unwrap();
        assert_eq!(def.network.mode, NetworkMode::None);
    }

    #[test]
    fn every_resource_key_parses() {
        let def = parse(&with_root(
            "[resources]\nmemory = \"1G\"\nmemory_high = \"768M\"\ncpus = 0.5\ncpu_weight = 200\ntasks = 64\nio_weight = 10000\n",
        ))
        .unwrap();
        assert_eq!(
            def.resources,
            Resources {
                memory: Some(1 << 30),
                memory_high: Some(768 << 20),
                cpus: Some(0.5),
                cpu_weight: Some(200),
                tasks: Some(64),
                io_weight: Some(10_000),
            }
        );
    }

    #[test]
    fn bad_resources_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("memory = \"512X\"", "resources.memory"),
            ("memory = \"0\"", "resources.memory"),
            ("memory = 0", "resources.memory"),
            ("memory = \"M\"", "resources.memory"),
            ("memory = \"99999999999T\"", "resources.memory"),
            ("cpus = 0", "resources.cpus"),
            ("cpus = -1.5", "resources.cpus"),
            ("cpus = 1025", "resources.cpus"),
            ("cpus = nan", "resources.cpus"),
            ("cpus = \"two\"", "resources.cpus"),
            ("tasks = 0", "resources.tasks"),
            ("memory_high = \"1Q\"", "resources.memory_high"),
            ("memory_high = 0", "resources.memory_high"),
            ("cpu_weight = 0", "resources.cpu_weight"),
            ("cpu_weight = 10001", "resources.cpu_weight"),
            ("cpu_weight = \"high\"", "resources.cpu_weight"),
            ("io_weight = -1", "resources.io_weight"),
            ("io_weight = 20000", "resources.io_weight"),
        ];
        for (line, key) in cases {
            expect_error(&with_root(&format!("[resources]\n{line}\n")), 3, key);
        }
    }

    #[test]
    fn bad_binds_are_rejected() {
        let bind = |source: &str, target: &str| {
            with_root(&format!("[[bind]]\nsource = \"/ok\"\ntarget = \"/ok\"\n[[bind]]\nsource = \"{source}\"\ntarget = \"{target}\"\n"))
        };
        expect_error(&bind("relative", "/srv"), 6, "bind.source");
        expect_error(&bind("/srv", "srv"), 7, "bind.target");
        expect_error(&bind("/srv", "/"), 7, "bind.target");
        expect_error(&bind("/srv", "/srv/../etc"), 7, "bind.target");
    }

    #[test]
    fn devices_are_paths_under_dev() {
        let def = parse(&with_root(
            "allow_exposed_root = true\n[devices]\nallow = [\"/dev/fuse\", \"/dev/net/tun\"]\n",
        ))
        .unwrap();
        assert_eq!(
            def.devices,
            vec![PathBuf::from("/dev/fuse"), PathBuf::from("/dev/net/tun")]
        );
        assert!(def.allow_exposed_root);
        for bad in [
            "fuse",
            "/dev",
            "/dev/",
            "/etc/fuse",
            "/dev/../sda",
            "/dev/pts/0",
            "/dev/console",
        ] {
            expect_error(
                &with_root(&format!("[devices]\nallow = [\"{bad}\"]\n")),
                3,
                "devices.allow",
            );
        }
        expect_error(&with_root("[devices]\nnodes = []\n"), 3, "devices.nodes");
    }

    #[test]
    fn durations() {
        for (text, expected) in [
            ("30s", Duration::from_secs(30)),
            ("500ms", Duration::from_millis(500)),
            ("2min", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("45", Duration::from_secs(45)),
            ("1min30s", Duration::from_secs(90)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in ["", "s", "30x", "1.5s", "-3s"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024K"), Ok(1 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1.5G").is_err());
    }

    #[test]
    fn names() {
        for good in ["web", "0", "a.b-c", "web-", &"a".repeat(64)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "Web",
            "-web",
            ".web",
            "a..b",
            "a/b",
            "a\0b",
            "a_b",
            "a b",
            long.as_str(),
        ] {
            let err = validate_name(bad).expect_err(bad);
            assert!(err.to_string().ends_with(|c: char| c != '.'), "{err}");
        }
    }

    #[test]
    fn restart_policy_round_trips() {
        for value in RestartPolicy::ALL {
            assert_eq!(value.to_string().parse::<RestartPolicy>(), Ok(value));
        }
        assert!("never".parse::<RestartPolicy>().is_err());
    }

    #[test]
    fn notify_ready_round_trips() {
        for value in NotifyReady::ALL {
            assert_eq!(value.to_string().parse::<NotifyReady>(), Ok(value));
        }
        assert!("true".parse::<NotifyReady>().is_err());
    }

    #[test]
    fn network_mode_round_trips() {
        for value in NetworkMode::ALL {
            assert_eq!(value.to_string().parse::<NetworkMode>(), Ok(value));
        }
        assert!("host".parse::<NetworkMode>().is_err());
    }

    #[test]
    fn reach_round_trips() {
        for value in Reach::ALL {
            assert_eq!(value.to_string().parse::<Reach>(), Ok(value));
        }
        assert!("everything".parse::<Reach>().is_err());
    }

    #[test]
    fn reach_and_isolated_parse() {
        let def = parse(&with_root(
            "[network]\nreach = \"outside\"\nisolated = true\n",
        ))
        .unwrap();
        assert_eq!(def.network.reach, Reach::Outside);
        assert!(def.network.isolated);
        let def = parse(&with_root("[network]\nreach = \"nothing\"\n")).unwrap();
        assert_eq!(def.network.reach, Reach::Nothing);
        assert!(!def.network.isolated);
        expect_error(
            &with_root("[network]\nmode = \"none\"\nreach = \"outside\"\n"),
            4,
            "network.reach",
        );
        expect_error(
            &with_root("[network]\nmode = \"none\"\nisolated = true\n"),
            4,
            "network.isolated",
        );
    }

    #[test]
    fn protocol_round_trips() {
        for value in Protocol::ALL {
            assert_eq!(value.to_string().parse::<Protocol>(), Ok(value));
        }
        assert!("sctp".parse::<Protocol>().is_err());
    }

    #[test]
    fn stop_signal_round_trips() {
        let mut values = vec![StopSignal::Auto];
        values.extend((1..=libc::SIGRTMAX()).map(StopSignal::Signal));
        for value in values {
            assert_eq!(
                value.to_string().parse::<StopSignal>(),
                Ok(value),
                "{value}"
            );
        }
        assert_eq!(StopSignal::Signal(libc::SIGTERM).to_string(), "SIGTERM");
        assert_eq!(
            StopSignal::Signal(libc::SIGRTMIN() + 3).to_string(),
            "SIGRTMIN+3"
        );
    }

    #[test]
    fn signal_spellings() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("sigint"), Some(libc::SIGINT));
        assert_eq!(parse_signal("SIGRTMIN+3"), Some(libc::SIGRTMIN() + 3));
        assert_eq!(parse_signal("RTMIN+4"), Some(libc::SIGRTMIN() + 4));
        assert_eq!(parse_signal("RTMIN"), Some(libc::SIGRTMIN()));
        assert_eq!(parse_signal("SIGRTMAX-1"), Some(libc::SIGRTMAX() - 1));
        assert_eq!(parse_signal("15"), Some(15));
        for bad in [
            "", "0", "65", "RTMIN+", "RTMIN-1", "RTMIN+40", "SIG", "FOO", "+3",
        ] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn root_or_image_exactly_one() {
        let def = parse("image = \"debian\"\n").unwrap();
        assert_eq!(def.image.as_deref(), Some("debian"));
        let err = expect_error("root = \"/srv\"\nimage = \"debian\"\n", 2, "image");
        assert!(err.contains("either root or image"), "{err}");
        let err = expect_error("image = \"Deb/ian\"\n", 1, "image");
        assert!(err.contains("image name"), "{err}");
        let err = parse("boot = true\n").unwrap_err().to_string();
        assert!(
            err.contains("key \"root\"") && err.contains("image"),
            "{err}"
        );
    }

    #[test]
    fn user_and_working_directory() {
        let def = parse(&with_root(
            "user = \"1000:100\"\nworking_directory = \"/app\"\n",
        ))
        .unwrap();
        assert_eq!(def.user, Some((1000, 100)));
        assert_eq!(def.working_directory, Some(PathBuf::from("/app")));
        expect_error(&with_root("user = \"www-data\"\n"), 2, "user");
        expect_error(
            &with_root("working_directory = \"app\"\n"),
            2,
            "working_directory",
        );
    }

    #[test]
    fn load_definition_resolves_images_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(images.join("debian")).unwrap();
        let file = write(dir.path(), "web.toml", "\nimage = \"debian\"\n");
        let def = load_definition(&file, &images).unwrap();
        assert_eq!(def.root, images.join("debian"));
        let file = write(dir.path(), "db.toml", "\nimage = \"alpine\"\n");
        let err = load_definition(&file, &images).unwrap_err();
        assert_eq!((err.line(), err.key()), (Some(2), Some("image")), "{err}");
        assert!(
            err.to_string().contains("rmachinectl image import alpine"),
            "{err}"
        );
    }

    #[test]
    fn load_definition_checks_root_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let good = write(dir.path(), "good.toml", &format!("root = {:?}\n", root));
        let def = load_definition(&good, dir.path()).unwrap();
        assert_eq!(def.name, "good");
        assert_eq!(def.root, root);

        let missing = write(
            dir.path(),
            "missing.toml",
            &format!("\nroot = {:?}\n", dir.path().join("nope")),
        );
        let err = load_definition(&missing, dir.path()).unwrap_err();
        assert_eq!((err.line(), err.key()), (Some(2), Some("root")), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("{}:2: key \"root\"", missing.display())));

        let file_root = write(dir.path(), "file.toml", &format!("root = {:?}\n", good));
        let err = load_definition(&file_root, dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let bad_name = write(dir.path(), "Bad_Name.toml", &format!("root = {:?}\n", root));
        let err = load_definition(&bad_name, dir.path()).unwrap_err();
        assert!(matches!(err, DefinitionError::Name { .. }));
        assert!(err.to_string().contains("Bad_Name.toml"), "{err}");

        let err = load_definition(&dir.path().join("absent.toml"), dir.path()).unwrap_err();
        assert!(matches!(err, DefinitionError::Read { .. }), "{err}");
    }

    #[test]
    fn load_dir_keeps_going_past_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        write(dir.path(), "web.toml", &format!("root = {:?}\n", root));
        write(dir.path(), "broken.toml", "root = \n");
        write(dir.path(), "Bad.toml", &format!("root = {:?}\n", root));
        write(dir.path(), "notes.txt", "not a machine");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write(
            &dir.path().join("sub"),
            "nested.toml",
            &format!("root = {:?}\n", root),
        );

        let loaded = load_dir(dir.path(), dir.path()).unwrap();
        let names: Vec<&str> = loaded.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["Bad", "broken", "web"]);
        assert!(matches!(
            loaded[0].result,
            Err(DefinitionError::Name { .. })
        ));
        let broken = loaded[1].result.as_ref().unwrap_err();
        assert_eq!(broken.line(), Some(1), "{broken}");
        assert_eq!(loaded[2].result.as_ref().unwrap().root, root);
        assert_eq!(loaded[2].file, dir.path().join("web.toml"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped examples parse as they are.
    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            parse_definition(&name, &path, &text).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
        assert_eq!(seen, 4);
        let limited = dir.join("limited.toml");
        let text = std::fs::read_to_string(&limited).unwrap();
        let def = parse_definition("limited", &limited, &text).unwrap();
        assert_eq!(def.resources.memory, Some(1 << 30));
        assert_eq!(def.resources.cpus, Some(1.5));
    }
}
