//! Files read from a guest's tree are untrusted input.
//!
//! A guest's root owns its tree: any file we read there may be a symlink to
//! a host file, a FIFO nobody writes, a device node, or gigabytes long. So
//! every read goes through [`read`]: the path is resolved inside the root
//! (`openat2` `RESOLVE_IN_ROOT`, no magic links), opened `O_PATH` first so
//! that opening has no side effect, must be a regular file, is then opened
//! for reading non-blocking, and is read up to a size cap.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::sys;

/// Cap for one-line files (machine-id, hostname).
pub const SMALL: usize = 4096;
/// Cap for account databases (/etc/passwd, /etc/group).
pub const ACCOUNTS: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    #[error("opening the guest's {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest's {path} is a {kind}, not a regular file; refusing to read it")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("the guest's {path} is larger than {limit} bytes; refusing to read it")]
    TooLarge { path: PathBuf, limit: usize },
    #[error("reading the guest's {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the regular file `path` of the tree rooted at `root`, at most
/// `limit` bytes (a longer file is an error, not truncated).
pub fn read(root: BorrowedFd<'_>, path: &Path, limit: usize) -> Result<Vec<u8>, GuestFileError> {
    let open_err = |source| GuestFileError::Open {
        path: path.to_owned(),
        source,
    };
    let handle = sys::open_in_root(root, path, libc::O_PATH).map_err(open_err)?;
    let meta = nix::sys::stat::fstat(&handle).map_err(|e| open_err(std::io::Error::from(e)))?;
    let kind = file_kind(meta.st_mode);
    if kind != "regular file" {
        return Err(GuestFileError::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    // Reopening the O_PATH handle opens that very inode: no second lookup
    // a guest could race.
    let file = sys::reopen(
        handle.as_fd(),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
    .map_err(open_err)?;
    let mut data = Vec::new();
    File::from(file)
        .take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|source| GuestFileError::Read {
            path: path.to_owned(),
            source,
        })?;
    if data.len() > limit {
        return Err(GuestFileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(data)
}

/// [`read`] as text (invalid UTF-8 replaced).
pub fn read_text(
    root: BorrowedFd<'_>,
    path: &Path,
    limit: usize,
) -> Result<String, GuestFileError> {
    read(root, path, limit).map(|d| String::from_utf8_lossy(&d).into_owned())
}

/// What the entry `name` in the guest directory `dir` is, without
/// following a final symlink: None when it does not exist.
pub fn entry_kind(dir: BorrowedFd<'_>, name: &str) -> Option<&'static str> {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| file_kind(st.st_mode))
}

fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "FIFO",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let root = File::open(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn reads_a_regular_file_inside_the_root() {
        let (dir, root) = tree();
        std::fs::write(dir.path().join("etc/machine-id"), "abc\n").unwrap();
        let text = read_text(root.as_fd(), Path::new("/etc/machine-id"), SMALL).unwrap();
        assert_eq!(text, "abc\n");
    }

    #[test]
    fn a_symlink_to_a_host_file_stays_inside_the_root() {
        let (dir, root) = tree();
        let host = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(host.path(), "host secret").unwrap();
        symlink(host.path(), dir.path().join("etc/machine-id")).unwrap();
        let err = read(root.as_fd(), Path::new("/etc/machine-id"), SMALL).unwrap_err();
        assert!(matches!(err, GuestFileError::Open { .. }), "{err}");
        // Relative escapes are clamped at the root too.
        symlink(
            "../../../../../../../etc/hostname",
            dir.path().join("etc/x"),
        )
        .unwrap();
        assert!(read(root.as_fd(), Path::new("/etc/x"), SMALL).is_err());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (dir, root) = tree();
        nix::unistd::mkfifo(
            &dir.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let err = read(root.as_fd(), Path::new("/etc/passwd"), ACCOUNTS).unwrap_err();
        assert!(
            matches!(err, GuestFileError::NotRegular { kind: "FIFO", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_device_node_is_refused() {
        let (dir, root) = tree();
        symlink("/dev/zero", dir.path().join("etc/machine-id")).unwrap();
        // /dev/zero does not exist inside this root: refused either way.
        assert!(read(root.as_fd(), Path::new("/etc/machine-id"), SMALL).is_err());
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        // A root test host may create a real node; a plain user cannot.
        if nix::unistd::geteuid().is_root() {
            nix::sys::stat::mknod(
                &dir.path().join("dev/zero"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 5),
            )
            .unwrap();
            let err = read(root.as_fd(), Path::new("/etc/machine-id"), SMALL).unwrap_err();
            assert!(matches!(err, GuestFileError::NotRegular { .. }), "{err}");
        }
    }

    #[test]
    fn a_large_file_is_refused() {
        let (dir, root) = tree();
        std::fs::write(dir.path().join("etc/machine-id"), vec![b'a'; SMALL + 1]).unwrap();
        let err = read(root.as_fd(), Path::new("/etc/machine-id"), SMALL).unwrap_err();
        assert!(matches!(err, GuestFileError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn entry_kind_does_not_follow_symlinks() {
        let (dir, root) = tree();
        symlink("/nonexistent", dir.path().join("etc/resolv.conf")).unwrap();
        let etc = File::open(dir.path().join("etc")).unwrap();
        assert_eq!(entry_kind(etc.as_fd(), "resolv.conf"), Some("symlink"));
        assert_eq!(entry_kind(etc.as_fd(), "absent"), None);
        drop(root);
    }
}
