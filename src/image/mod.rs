//! Images: read-only OS trees in rmachined's store, `<storage-dir>/images/NAME`,
//! that machines use as the lower layer of an overlay root.
//!
//! An import streams a tar (plain, gzip, xz or zstd, told apart by their
//! first bytes) or an OCI image layout (a directory, or an uncompressed tar
//! of one) into `images/.partial-NAME`, then renames it to `images/NAME`; a
//! failed import leaves nothing. `images/.NAME.json` describes the image.
//! The store directories are 0700: an image holds set-id programs that no
//! host user may reach.

pub mod extract;
mod oci;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use extract::Extractor;
pub use extract::Stats;

/// `<storage-dir>/images`.
pub fn images_dir(storage_dir: &Path) -> PathBuf {
    storage_dir.join("images")
}

/// `<storage-dir>/machines/NAME`: the writable layer of a machine made from
/// an image.
pub fn layer_dir(storage_dir: &Path, machine: &str) -> PathBuf {
    storage_dir.join("machines").join(machine)
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    InvalidName(String),
    #[error("no image named {0:?} is imported (see `rmachinectl image list`)")]
    NoSuchImage(String),
    #[error(
        "an image named {0:?} already exists; remove it first (`rmachinectl image remove {0}`)"
    )]
    Exists(String),
    #[error("an import of {0:?} is already running")]
    Busy(String),
    #[error("image {name:?} is used by machine(s) {machines}; remove them first (`rmachinectl remove MACHINE`) or change their definitions")]
    InUse { name: String, machines: String },
    #[error("the archive holds a path that leads out of the image: {0:?}; nothing was imported")]
    Escape(String),
    #[error("{0}")]
    Archive(String),
    #[error("{0}")]
    Oci(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// What `--format` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Told from the source: a directory or a tar holding `oci-layout` is
    /// an OCI layout, anything else a tar of a tree.
    Auto,
    Tar,
    Oci,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Auto, Format::Tar, Format::Oci];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Auto => "",
            Format::Tar => "tar",
            Format::Oci => "oci",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not an image format; expected \"tar\", \"oci\" or \"\" (detect)")
            })
    }
}

/// An OCI image's runtime defaults (its config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One image of the store, as `images/.NAME.json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// `tar` or `oci`.
    pub format: String,
    /// The OCI reference the manifest was picked by (empty for a tar).
    #[serde(default)]
    pub reference: String,
    /// Realtime microseconds of the import.
    pub imported: u64,
    /// Bytes of regular files.
    pub size: u64,
    pub stats: Stats,
    #[serde(default)]
    pub config: Option<OciConfig>,
}

/// How far an import is: bytes of the source read, and the total (0 when
/// unknown, e.g. from a pipe). Read by whoever shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// Creates `dir` (and parents) and makes it 0700, whatever it was.
pub fn ensure_private_dir(dir: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("making {} private", dir.display())))
}

fn check_name(name: &str) -> Result<(), ImageError> {
    crate::definition::validate_image_name(name).map_err(ImageError::InvalidName)
}

fn metadata_path(images: &Path, name: &str) -> PathBuf {
    images.join(format!(".{name}.json"))
}

/// Every image in the store, sorted by name.
pub fn list(images: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let entries = match fs::read_dir(images) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("reading {}", images.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", images.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || check_name(&name).is_err() {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        found.push(info(images, &name).unwrap_or_else(|_| ImageInfo {
            name: name.clone(),
            format: String::new(),
            reference: String::new(),
            imported: 0,
            size: 0,
            stats: Stats::default(),
            config: None,
        }));
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The description of image `name`.
pub fn info(images: &Path, name: &str) -> Result<ImageInfo, ImageError> {
    check_name(name)?;
    if !images.join(name).is_dir() {
        return Err(ImageError::NoSuchImage(name.to_owned()));
    }
    let path = metadata_path(images, name);
    let data = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
    serde_json::from_slice(&data).map_err(|e| ImageError::Io {
        what: format!("parsing {}", path.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Removes image `name` (the caller checked that no machine uses it).
pub fn remove(images: &Path, name: &str) -> Result<(), ImageError> {
    check_name(name)?;
    let tree = images.join(name);
    if !tree.is_dir() {
        return Err(ImageError::NoSuchImage(name.to_owned()));
    }
    // Out of sight first, so a half-removed tree is never an image.
    let doomed = images.join(format!(".removing-{name}-{}", std::process::id()));
    fs::rename(&tree, &doomed).map_err(io_err(format!("moving {} away", tree.display())))?;
    let _ = fs::remove_file(metadata_path(images, name));
    fs::remove_dir_all(&doomed).map_err(io_err(format!("removing {}", doomed.display())))
}

/// Removes what an interrupted import or removal left in the store.
pub fn remove_leftovers(images: &Path) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".partial-") || name.starts_with(".removing-") {
            tracing::info!(path = %entry.path().display(), "removing an interrupted import");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// What to import.
pub struct ImportRequest {
    pub name: String,
    /// The caller's file, pipe or directory.
    pub source: OwnedFd,
    pub format: Format,
    /// The OCI manifest tag (`org.opencontainers.image.ref.name`).
    pub reference: Option<String>,
}

/// The first bytes of a compressed stream, and what decodes it.
enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

fn sniff(head: &[u8]) -> Result<Compression, ImageError> {
    Ok(match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [b'B', b'Z', b'h', ..] => {
            return Err(ImageError::Unsupported(
                "bzip2 is not supported; decompress it first (bunzip2) or use gzip, xz or zstd"
                    .into(),
            ))
        }
        _ => Compression::None,
    })
}

/// Reads the first bytes of `reader` and returns a reader that decodes the
/// whole stream (the bytes read included).
pub(crate) fn decompress<'a, R: Read + 'a>(mut reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut head = Vec::with_capacity(6);
    while head.len() < 6 {
        let mut byte = [0u8; 6];
        let want = 6 - head.len();
        let n = reader.read(&mut byte[..want])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&byte[..n]);
    }
    let kind =
        sniff(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let whole = io::Cursor::new(head).chain(reader);
    Ok(match kind {
        Compression::None => Box::new(whole),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(whole)?),
    })
}

/// Counts what passes through into `progress.done`.
struct Counting<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Imports `request` into `images`; returns the new image's description.
/// Runs for as long as the source takes (call it off the async runtime).
pub fn import(
    images: &Path,
    request: ImportRequest,
    progress: &Progress,
) -> Result<ImageInfo, ImageError> {
    let name = request.name.clone();
    check_name(&name)?;
    ensure_private_dir(images)?;
    let tree = images.join(&name);
    if tree.exists() {
        return Err(ImageError::Exists(name));
    }
    let partial = images.join(format!(".partial-{name}"));
    if partial.exists() {
        // The caller serialises imports of one name: this is a crash's.
        fs::remove_dir_all(&partial).map_err(io_err(format!("removing {}", partial.display())))?;
    }
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&partial)
        .map_err(io_err(format!("creating {}", partial.display())))?;
    let result = fill(&partial, request, progress);
    let (stats, format, reference, config) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(err);
        }
    };
    let finished = (|| {
        let root =
            File::open(&partial).map_err(io_err(format!("opening {}", partial.display())))?;
        // SAFETY: syncfs(2) on a descriptor we own.
        if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
            return Err(io_err("syncing the image")(io::Error::last_os_error()));
        }
        rename_noreplace(&partial, &tree).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                ImageError::Exists(name.clone())
            } else {
                io_err(format!(
                    "renaming {} to {}",
                    partial.display(),
                    tree.display()
                ))(e)
            }
        })
    })();
    if let Err(err) = finished {
        let _ = fs::remove_dir_all(&partial);
        return Err(err);
    }
    let info = ImageInfo {
        name: name.clone(),
        format: format.to_owned(),
        reference,
        imported: crate::runtime::protocol::now_usec(),
        size: stats.bytes,
        stats,
        config,
    };
    let meta = metadata_path(images, &name);
    let temp = images.join(format!(".partial-{name}.json"));
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    fs::write(&temp, json)
        .and_then(|()| fs::rename(&temp, &meta))
        .map_err(io_err(format!("writing {}", meta.display())))?;
    Ok(info)
}

type Filled = (Stats, &'static str, String, Option<OciConfig>);

/// Extracts the source into the directory `partial`.
fn fill(partial: &Path, request: ImportRequest, progress: &Progress) -> Result<Filled, ImageError> {
    let root = File::open(partial).map_err(io_err(format!("opening {}", partial.display())))?;
    let mut extractor = Extractor::new(OwnedFd::from(root));
    let source = File::from(request.source);
    let meta = source.metadata().map_err(io_err("inspecting the source"))?;
    let reference = request.reference.as_deref();
    if meta.is_dir() {
        if request.format == Format::Tar {
            return Err(ImageError::Unsupported(
                "a directory is imported as an OCI image layout (--format oci); to import a plain \
                 tree, pipe it as a tar: tar -C DIR -c . | rmachinectl image import NAME -"
                    .into(),
            ));
        }
        let layout = oci::Layout::Dir(OwnedFd::from(source));
        let (config, tag) = oci::import_layout(&layout, reference, &mut extractor, progress)?;
        return Ok((extractor.finish()?, "oci", tag, Some(config)));
    }
    if meta.is_file() {
        let mut file = source;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("reading the source"))?;
        let mut head = [0u8; 6];
        let n = read_head(&mut file, &mut head)?;
        let compressed = !matches!(sniff(&head[..n])?, Compression::None);
        if !compressed && request.format != Format::Tar {
            file.seek(SeekFrom::Start(0))
                .map_err(io_err("reading the source"))?;
            let layout = oci::Layout::tar(file.try_clone().map_err(io_err("reading the source"))?)?;
            if layout.is_layout() {
                let (config, tag) =
                    oci::import_layout(&layout, reference, &mut extractor, progress)?;
                return Ok((extractor.finish()?, "oci", tag, Some(config)));
            }
        }
        if request.format == Format::Oci {
            return Err(ImageError::Unsupported(
                "the file is not an OCI image layout (an uncompressed tar holding oci-layout and \
                 index.json)"
                    .into(),
            ));
        }
        progress.total.store(meta.len(), Ordering::Relaxed);
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("reading the source"))?;
        return tar_stream(file, extractor, progress)
            .map(|stats| (stats, "tar", String::new(), None));
    }
    if request.format == Format::Oci {
        return Err(ImageError::Unsupported(
            "an OCI archive must be a seekable file or a directory, not a pipe; save it to a file \
             or unpack it into a directory first"
                .into(),
        ));
    }
    tar_stream(source, extractor, progress).map(|stats| (stats, "tar", String::new(), None))
}

fn read_head(file: &mut File, head: &mut [u8]) -> Result<usize, ImageError> {
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading the source")(e)),
        }
    }
    Ok(n)
}

fn tar_stream(
    source: File,
    mut extractor: Extractor,
    progress: &Progress,
) -> Result<Stats, ImageError> {
    let counting = Counting {
        inner: io::BufReader::with_capacity(1 << 20, source),
        progress,
    };
    let mut decoded = decompress(counting)
        .map_err(|e| ImageError::Archive(format!("reading the source: {e}")))?;
    extractor.apply(&mut decoded, false)?;
    // The rest (padding, a compressor's trailer) is read too, so a writer
    // on a pipe is not cut off.
    io::copy(&mut decoded, &mut io::sink())
        .map_err(|e| ImageError::Archive(format!("reading the source: {e}")))?;
    extractor.finish()
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: renameat2(2) with two NUL-terminated paths.
    let ret = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a machine's writable layer (`upper/`, `work/`) if missing. The
/// upper directory takes the image root's owner and mode: it is the
/// machine's `/`.
pub fn prepare_layer(
    storage_dir: &Path,
    machine: &str,
    image_root: &Path,
) -> Result<PathBuf, ImageError> {
    let machines = storage_dir.join("machines");
    ensure_private_dir(&machines)?;
    let layer = layer_dir(storage_dir, machine);
    let root_meta =
        fs::metadata(image_root).map_err(io_err(format!("inspecting {}", image_root.display())))?;
    for (dir, mode) in [(&layer, 0o700), (&layer.join("work"), 0o700)] {
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
    }
    let upper = layer.join("upper");
    match fs::DirBuilder::new().mode(0o700).create(&upper) {
        Ok(()) => {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(&upper, Some(root_meta.uid()), Some(root_meta.gid()))
                .map_err(io_err(format!("creating {}", upper.display())))?;
            fs::set_permissions(
                &upper,
                fs::Permissions::from_mode(root_meta.mode() & 0o7777),
            )
            .map_err(io_err(format!("creating {}", upper.display())))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", upper.display()))(e)),
    }
    Ok(layer)
}

/// Removes a machine's writable layer, if it has one.
pub fn remove_layer(storage_dir: &Path, machine: &str) -> Result<(), ImageError> {
    let layer = layer_dir(storage_dir, machine);
    match fs::remove_dir_all(&layer) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", layer.display()))(e)),
    }
}

/// Whether the image's tree has an executable `/sbin/init` (a full OS).
pub fn has_init(tree: &Path) -> bool {
    let Ok(root) = File::open(tree) else {
        return false;
    };
    crate::runtime::sys::open_in_root(root.as_fd(), Path::new("/sbin/init"), libc::O_PATH)
        .ok()
        .and_then(|fd| fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok())
        .is_some_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Largest guest file (`/etc/passwd`, `/etc/group`) read from an image.
const GUEST_FILE_LIMIT: u64 = 1 << 20;

/// Reads a regular file of the image's tree, resolved inside it.
fn read_guest_file(tree: &Path, path: &str) -> Option<String> {
    let root = File::open(tree).ok()?;
    let fd = crate::runtime::sys::open_in_root(
        root.as_fd(),
        Path::new(path),
        libc::O_RDONLY | libc::O_NONBLOCK,
    )
    .ok()?;
    let file = File::from(fd);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(GUEST_FILE_LIMIT).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The numeric `UID:GID` of an OCI `User` (`uid`, `uid:gid`, `name`,
/// `name:group`), names looked up in the image's /etc/passwd and /etc/group.
fn resolve_user(tree: &Path, user: &str) -> Result<(u32, u32), ImageError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_guest_file(tree, "/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == user_part || f[2] == user_part));
    let uid = match user_part.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| {
                ImageError::Unsupported(format!(
                    "the image's User {user:?} is not in its /etc/passwd"
                ))
            })?,
    };
    let gid = match group_part {
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read_guest_file(tree, "/etc/group")
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == group)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    ImageError::Unsupported(format!(
                        "the image's group {group:?} (User {user:?}) is not in its /etc/group"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
}

/// The absolute path of `program` along `path` (a `PATH` value) inside
/// the image's tree.
fn resolve_program(tree: &Path, program: &str, path: &str) -> Result<String, ImageError> {
    let root = File::open(tree).map_err(io_err(format!("opening {}", tree.display())))?;
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{}/{program}", dir.trim_end_matches('/'));
        let found =
            crate::runtime::sys::open_in_root(root.as_fd(), Path::new(&candidate), libc::O_PATH)
                .ok()
                .and_then(|fd| fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok())
                .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if found {
            return Ok(candidate);
        }
    }
    Err(ImageError::Unsupported(format!(
        "the image's command {program:?} is not an executable in its PATH ({path})"
    )))
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The text of a definition for a machine made from image `info` (its tree
/// at `tree`). A full OS (it has /sbin/init) boots; an OCI image without
/// one runs its `Entrypoint` + `Cmd` with its `Env`, `WorkingDir` and
/// `User` as `boot = false`.
pub fn definition_text(
    info: &ImageInfo,
    tree: &Path,
    ephemeral: bool,
    autostart: bool,
) -> Result<String, ImageError> {
    use toml::Value;
    let mut table = toml::Table::new();
    table.insert("image".into(), Value::String(info.name.clone()));
    if ephemeral {
        table.insert("ephemeral".into(), Value::Boolean(true));
    }
    if autostart {
        table.insert("autostart".into(), Value::Boolean(true));
    }
    let mut origin = "a full OS: it boots its /sbin/init";
    if let Some(config) = info.config.as_ref().filter(|_| !has_init(tree)) {
        origin = "the defaults of its OCI config";
        let mut argv: Vec<String> = config
            .entrypoint
            .iter()
            .chain(config.cmd.iter())
            .cloned()
            .collect();
        let Some(program) = argv.first_mut() else {
            return Err(ImageError::Unsupported(format!(
                "image {:?} has no /sbin/init and its OCI config names no Entrypoint or Cmd;                  write the definition by hand with `boot = false` and `command`",
                info.name
            )));
        };
        let mut environment = toml::Table::new();
        for pair in &config.env {
            if let Some((key, value)) = pair.split_once('=') {
                if !key.is_empty() && !pair.contains('\0') {
                    environment.insert(key.to_owned(), Value::String(value.to_owned()));
                }
            }
        }
        if !program.starts_with('/') {
            let path = environment
                .get("PATH")
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_PATH);
            *program = resolve_program(tree, program, path)?;
        }
        table.insert("boot".into(), Value::Boolean(false));
        table.insert(
            "command".into(),
            Value::Array(argv.into_iter().map(Value::String).collect()),
        );
        if !environment.is_empty() {
            table.insert("environment".into(), Value::Table(environment));
        }
        if config.working_dir.starts_with('/') {
            table.insert(
                "working_directory".into(),
                Value::String(config.working_dir.clone()),
            );
        }
        if !config.user.is_empty() {
            let (uid, gid) = resolve_user(tree, &config.user)?;
            table.insert("user".into(), Value::String(format!("{uid}:{gid}")));
        }
    }
    let body = toml::to_string(&table).map_err(|e| ImageError::Unsupported(e.to_string()))?;
    Ok(format!(
        "# Created by `rmachinectl create` from image {:?}, {origin}.\n{body}",
        info.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_round_trips() {
        for format in Format::ALL {
            assert_eq!(format.as_str().parse::<Format>(), Ok(format));
        }
        assert!("zip".parse::<Format>().is_err());
    }

    #[test]
    fn compression_is_told_by_content() {
        assert!(matches!(sniff(&[0x1f, 0x8b, 8, 0]), Ok(Compression::Gzip)));
        assert!(matches!(sniff(b"\xfd7zXZ\0"), Ok(Compression::Xz)));
        assert!(matches!(
            sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Ok(Compression::Zstd)
        ));
        assert!(matches!(sniff(b"etc/\0\0"), Ok(Compression::None)));
        assert!(sniff(b"BZh91A").is_err());
    }
}
