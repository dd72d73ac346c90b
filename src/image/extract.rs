//! Applies tar streams to an image tree without ever leaving it: every path
//! of an archive is resolved inside the tree (`openat2` `RESOLVE_IN_ROOT`),
//! and the last component is created with `*at` calls that do not follow
//! symlinks. An archive is hostile input: a `..` component refuses the
//! import, a symlink met on the way leads to the tree's own directories, a
//! hard link can only name a file of the tree, device nodes are dropped.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::ImageError;
use crate::runtime::sys;

/// What an import wrote and what it left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Character and block devices, which an image never keeps.
    pub devices_dropped: u64,
    /// Extended attributes not kept (`trusted.*`, `security.*` other than
    /// file capabilities, overlayfs' own).
    pub xattrs_dropped: u64,
    /// OCI whiteouts applied.
    pub whiteouts: u64,
}

/// Writes archive entries into the tree whose directory is `root`.
pub(crate) struct Extractor {
    root: OwnedFd,
    stats: Stats,
    /// Directory modification times, set once their contents are written.
    dir_times: Vec<(PathBuf, i64)>,
    /// Paths written by the layer being applied (OCI whiteouts only hide
    /// what earlier layers wrote).
    this_layer: HashSet<PathBuf>,
}

/// The path of an entry inside the tree: relative, without `.`, refused
/// when a component is `..`. The empty path is the tree's root.
pub(crate) fn tree_path(raw: &Path) -> Result<PathBuf, ImageError> {
    let mut clean = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::Escape(raw.display().to_string()))
            }
        }
    }
    Ok(clean)
}

fn cstring(name: &OsStr) -> Result<CString, ImageError> {
    CString::new(name.as_bytes())
        .map_err(|_| ImageError::Archive("a path contains a NUL byte".into()))
}

fn io_at(what: &str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let what = format!("{what} {}", path.display());
    move |source| ImageError::Io { what, source }
}

fn errno_at(what: &str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> ImageError {
    let f = io_at(what, path);
    move |errno| f(errno.into())
}

/// Which extended attributes an image keeps.
fn keeps_xattr(name: &str) -> bool {
    if name.starts_with("user.overlay.") {
        return false;
    }
    name.starts_with("user.")
        || name == "security.capability"
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

impl Extractor {
    /// `root` is the (empty or partly filled) tree's directory.
    pub(crate) fn new(root: OwnedFd) -> Self {
        Extractor {
            root,
            stats: Stats::default(),
            dir_times: Vec::new(),
            this_layer: HashSet::new(),
        }
    }

    /// Applies one tar stream. With `oci`, `.wh.NAME` entries remove NAME
    /// and `.wh..wh..opq` empties its directory of earlier layers' files.
    pub(crate) fn apply<R: Read>(&mut self, reader: R, oci: bool) -> Result<(), ImageError> {
        self.this_layer.clear();
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| ImageError::Archive(format!("reading the tar stream: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| ImageError::Archive(format!("reading the tar stream: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| ImageError::Archive(format!("an entry has a bad path: {e}")))?
                .into_owned();
            let path = tree_path(&raw)?;
            if oci {
                if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    if let Some(hidden) = name.strip_prefix(".wh.") {
                        let parent = path.parent().unwrap_or(Path::new(""));
                        if hidden == ".wh..opq" {
                            self.make_opaque(parent)?;
                        } else {
                            self.whiteout(&parent.join(hidden))?;
                        }
                        self.stats.whiteouts += 1;
                        continue;
                    }
                }
            }
            self.write_entry(&mut entry, &path)?;
        }
        Ok(())
    }

    /// Sets the directories' times (their contents are complete) and returns
    /// what was written.
    pub(crate) fn finish(self) -> Result<Stats, ImageError> {
        for (path, mtime) in self.dir_times.iter().rev() {
            let Ok(fd) = sys::open_in_root(
                self.root.as_fd(),
                path,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            ) else {
                continue;
            };
            let _ = set_times(fd.as_fd(), None, *mtime);
        }
        Ok(self.stats)
    }

    fn write_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<(), ImageError> {
        use tar::EntryType;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let (mut uid, mut gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let link = entry
            .link_name()
            .map_err(|e| ImageError::Archive(format!("{}: bad link name: {e}", path.display())))?
            .map(|l| l.into_owned());
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry
            .pax_extensions()
            .map_err(|e| ImageError::Archive(format!("{}: bad PAX header: {e}", path.display())))?
        {
            for extension in extensions.flatten() {
                let Ok(key) = extension.key() else { continue };
                match key {
                    "uid" => uid = parse_id(extension.value_bytes()).unwrap_or(uid),
                    "gid" => gid = parse_id(extension.value_bytes()).unwrap_or(gid),
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            if keeps_xattr(name) {
                                xattrs.push((name.to_owned(), extension.value_bytes().to_vec()));
                            } else {
                                self.stats.xattrs_dropped += 1;
                            }
                        }
                    }
                }
            }
        }
        let meta = Meta {
            uid,
            gid,
            mode,
            xattrs,
        };

        if path.as_os_str().is_empty() {
            if kind == EntryType::Directory {
                let fd = sys::open_in_root(self.root.as_fd(), Path::new("."), libc::O_RDONLY)
                    .map_err(io_at("opening the image root", path))?;
                meta.apply(fd.as_fd(), path, &mut self.stats)?;
                self.dir_times.push((PathBuf::new(), mtime));
            }
            return Ok(());
        }
        match kind {
            EntryType::Char | EntryType::Block => {
                self.stats.devices_dropped += 1;
                return Ok(());
            }
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo => {}
            other => {
                tracing::debug!(path = %path.display(), ?other, "skipping an unsupported tar entry");
                return Ok(());
            }
        }
        let (parent, name) = self.parent_of(path)?;
        let cname = cstring(name)?;
        let is_dir = kind == EntryType::Directory;
        // A directory over a directory is merged (with the new metadata);
        // anything else replaces what was there.
        self.replace_existing(parent.as_fd(), &cname, is_dir, path)?;
        self.this_layer.insert(path.to_path_buf());
        let dirfd = parent.as_fd();
        match kind {
            EntryType::Directory => {
                match nix::sys::stat::mkdirat(
                    dirfd,
                    cname.as_c_str(),
                    nix::sys::stat::Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(errno_at("creating directory", path)(e)),
                }
                let fd = open_at(
                    parent.as_fd(),
                    &cname,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(io_at("opening directory", path))?;
                meta.apply(fd.as_fd(), path, &mut self.stats)?;
                self.dir_times.push((path.to_path_buf(), mtime));
                self.stats.directories += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = open_at(
                    parent.as_fd(),
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(io_at("creating", path))?;
                let mut file = File::from(fd);
                let written = io::copy(entry, &mut file)
                    .map_err(|e| ImageError::Archive(format!("{}: {e}", path.display())))?;
                self.stats.bytes += written;
                meta.apply(file.as_fd(), path, &mut self.stats)?;
                set_times(file.as_fd(), None, mtime).map_err(io_at("setting the time of", path))?;
                self.stats.files += 1;
            }
            EntryType::Symlink => {
                let target = link.ok_or_else(|| {
                    ImageError::Archive(format!("{}: a symlink without a target", path.display()))
                })?;
                nix::unistd::symlinkat(target.as_os_str(), dirfd, cname.as_c_str())
                    .map_err(errno_at("creating symlink", path))?;
                nix::unistd::fchownat(
                    dirfd,
                    cname.as_c_str(),
                    Some(uid.into()),
                    Some(gid.into()),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(errno_at("changing the owner of", path))?;
                let _ = set_times(parent.as_fd(), Some(&cname), mtime);
                self.stats.symlinks += 1;
            }
            EntryType::Link => {
                let target = link.ok_or_else(|| {
                    ImageError::Archive(format!("{}: a hard link without a target", path.display()))
                })?;
                let target = tree_path(&target)?;
                let source =
                    sys::open_in_root(self.root.as_fd(), &target, libc::O_PATH | libc::O_NOFOLLOW)
                        .map_err(|e| {
                            ImageError::Archive(format!(
                                "{}: hard link to {}, which is not in the image: {e}",
                                path.display(),
                                target.display()
                            ))
                        })?;
                let empty = CString::default();
                // SAFETY: linkat(2) with AT_EMPTY_PATH links the file the
                // O_PATH descriptor names; both strings are NUL-terminated.
                let ret = unsafe {
                    libc::linkat(
                        source.as_raw_fd(),
                        empty.as_ptr(),
                        dirfd.as_raw_fd(),
                        cname.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                };
                if ret != 0 {
                    return Err(io_at("creating hard link", path)(io::Error::last_os_error()));
                }
                self.stats.hard_links += 1;
            }
            EntryType::Fifo => {
                nix::sys::stat::mknodat(
                    dirfd,
                    cname.as_c_str(),
                    nix::sys::stat::SFlag::S_IFIFO,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    0,
                )
                .map_err(errno_at("creating fifo", path))?;
                let fd = open_at(parent.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
                    .map_err(io_at("opening fifo", path))?;
                // fchown/fchmod refuse O_PATH descriptors: go through /proc.
                let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
                nix::unistd::chown(proc.as_str(), Some(uid.into()), Some(gid.into()))
                    .map_err(errno_at("changing the owner of", path))?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    proc.as_str(),
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(errno_at("changing the mode of", path))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Opens the parent directory of `path` inside the tree, creating missing
    /// directories (0755, root) on the way.
    fn parent_of<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p OsStr), ImageError> {
        let name = path
            .file_name()
            .ok_or_else(|| ImageError::Escape(path.display().to_string()))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        if let Ok(fd) = sys::open_in_root(self.root.as_fd(), parent, flags) {
            return Ok((fd, name));
        }
        let mut so_far = PathBuf::new();
        let mut current = sys::open_in_root(self.root.as_fd(), Path::new("."), flags)
            .map_err(io_at("opening the image root for", path))?;
        for component in parent.components() {
            so_far.push(component);
            match sys::open_in_root(self.root.as_fd(), &so_far, flags) {
                Ok(fd) => current = fd,
                Err(_) => {
                    let cname = cstring(component.as_os_str())?;
                    match nix::sys::stat::mkdirat(
                        current.as_fd(),
                        cname.as_c_str(),
                        nix::sys::stat::Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => return Err(errno_at("creating directory", &so_far)(e)),
                    }
                    current =
                        sys::open_in_root(self.root.as_fd(), &so_far, flags).map_err(|e| {
                            ImageError::Archive(format!(
                                "{}: {} is not a directory of the image (a symlink to a path \
                                 the image does not have?): {e}",
                                path.display(),
                                so_far.display()
                            ))
                        })?;
                }
            }
        }
        Ok((current, name))
    }

    /// Removes what is at `name` in `parent` unless both it and the new
    /// entry are directories. Returns whether something was removed.
    fn replace_existing(
        &self,
        parent: BorrowedFd<'_>,
        name: &CString,
        new_is_dir: bool,
        path: &Path,
    ) -> Result<bool, ImageError> {
        let stat = match nix::sys::stat::fstatat(
            parent.as_fd(),
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(nix::errno::Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(errno_at("inspecting", path)(e)),
        };
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && new_is_dir {
            return Ok(false);
        }
        remove_at(parent, name, is_dir).map_err(io_at("replacing", path))?;
        Ok(true)
    }

    /// `.wh.NAME`: removes NAME unless this layer wrote it.
    fn whiteout(&mut self, path: &Path) -> Result<(), ImageError> {
        if self.this_layer.contains(path) {
            return Ok(());
        }
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        let parent = path.parent().unwrap_or(Path::new(""));
        let Ok(dir) =
            sys::open_in_root(self.root.as_fd(), parent, libc::O_PATH | libc::O_DIRECTORY)
        else {
            return Ok(());
        };
        let cname = cstring(name)?;
        self.replace_existing(dir.as_fd(), &cname, false, path)
            .map(drop)
    }

    /// `.wh..wh..opq` in `dir`: removes what earlier layers put in `dir`.
    fn make_opaque(&mut self, dir: &Path) -> Result<(), ImageError> {
        let Ok(fd) = sys::open_in_root(self.root.as_fd(), dir, libc::O_RDONLY | libc::O_DIRECTORY)
        else {
            return Ok(());
        };
        let names: Vec<PathBuf> = read_names(fd.as_fd()).map_err(io_at("listing", dir))?;
        for name in names {
            let path = dir.join(&name);
            if self.this_layer.contains(&path) {
                continue;
            }
            let cname = cstring(name.as_os_str())?;
            self.replace_existing(fd.as_fd(), &cname, false, &path)?;
        }
        Ok(())
    }
}

/// Owner, mode, extended attributes of one entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// chown before chmod (chown clears set-id bits) and before the
    /// xattrs (it clears file capabilities).
    fn apply(&self, fd: BorrowedFd<'_>, path: &Path, stats: &mut Stats) -> Result<(), ImageError> {
        nix::unistd::fchown(fd, Some(self.uid.into()), Some(self.gid.into()))
            .map_err(errno_at("changing the owner of", path))?;
        nix::sys::stat::fchmod(fd, nix::sys::stat::Mode::from_bits_truncate(self.mode))
            .map_err(errno_at("changing the mode of", path))?;
        for (name, value) in &self.xattrs {
            let cname = CString::new(name.as_bytes())
                .map_err(|_| ImageError::Archive("an xattr name contains a NUL byte".into()))?;
            // SAFETY: fsetxattr(2) reads the NUL-terminated name and
            // `value.len()` bytes of value.
            let ret = unsafe {
                libc::fsetxattr(
                    fd.as_raw_fd(),
                    cname.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if ret != 0 {
                let err = io::Error::last_os_error();
                tracing::debug!(path = %path.display(), name, %err, "xattr not kept");
                stats.xattrs_dropped += 1;
            }
        }
        Ok(())
    }
}

fn parse_id(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn open_at(
    dir: BorrowedFd<'_>,
    name: &CString,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: openat(2) with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets atime and mtime of `fd` (or of `name` in the directory `fd`,
/// not following a symlink).
fn set_times(fd: BorrowedFd<'_>, name: Option<&CString>, mtime: i64) -> io::Result<()> {
    let time = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    let empty = CString::default();
    let (path, flags) = match name {
        Some(name) => (name.as_ptr(), libc::AT_SYMLINK_NOFOLLOW),
        None => (empty.as_ptr(), libc::AT_EMPTY_PATH),
    };
    // SAFETY: utimensat(2) reads two timespecs and a NUL-terminated path.
    let ret = unsafe { libc::utimensat(fd.as_raw_fd(), path, times.as_ptr(), flags) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The names in a directory, without `.` and `..`.
fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<PathBuf>> {
    let dup = nix::unistd::dup(dir).map_err(io::Error::from)?;
    let mut listing = nix::dir::Dir::from_fd(dup).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(PathBuf::from(OsStr::from_bytes(name)));
        }
    }
    Ok(names)
}

/// Removes `name` in `parent`; a directory with everything in it. Never
/// follows a symlink.
pub(crate) fn remove_at(parent: BorrowedFd<'_>, name: &CString, is_dir: bool) -> io::Result<()> {
    if is_dir {
        let dir = open_at(
            parent,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        for child in read_names(dir.as_fd())? {
            let cchild = CString::new(child.as_os_str().as_bytes())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            let stat = nix::sys::stat::fstatat(
                &dir,
                cchild.as_c_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)?;
            remove_at(
                dir.as_fd(),
                &cchild,
                stat.st_mode & libc::S_IFMT == libc::S_IFDIR,
            )?;
        }
    }
    let flags = if is_dir {
        nix::unistd::UnlinkatFlags::RemoveDir
    } else {
        nix::unistd::UnlinkatFlags::NoRemoveDir
    };
    nix::unistd::unlinkat(parent.as_fd(), name.as_c_str(), flags).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_paths_stay_inside() {
        assert_eq!(
            tree_path(Path::new("./etc/passwd")).unwrap(),
            Path::new("etc/passwd")
        );
        assert_eq!(
            tree_path(Path::new("/usr/bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(tree_path(Path::new("./")).unwrap(), Path::new(""));
        assert!(matches!(
            tree_path(Path::new("a/../../etc")),
            Err(ImageError::Escape(_))
        ));
        assert!(tree_path(Path::new("../x")).is_err());
    }

    #[test]
    fn xattr_policy() {
        assert!(keeps_xattr("security.capability"));
        assert!(keeps_xattr("user.mime_type"));
        assert!(!keeps_xattr("user.overlay.opaque"));
        assert!(!keeps_xattr("trusted.overlay.opaque"));
        assert!(!keeps_xattr("security.selinux"));
    }
}
