//! Reading a file of a hostile guest tree (`guestfile::read`): the path
//! and the file's bytes are the guest's.
//!
//! The input is a path, a NUL, then the contents of `etc/data` in a fresh
//! guest root whose `etc/escape` is a symlink to `/..` and `etc/up` to
//! `../../` (both meant to leave the root), next to a secret file outside
//! the root.
//!
//! Invariants: what is read is a regular file inside the root (never the
//! secret), never more than the limit; a longer file is an error.
#![no_main]
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rmachines::runtime::guestfile::{self, GuestFileError};

const SECRET: &[u8] = b"outside-the-root-secret-7f3a9c";
const LIMIT: usize = 4096;

struct Tree {
    _dir: tempfile::TempDir,
    root: fs::File,
    data: std::path::PathBuf,
}

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        fs::write(dir.path().join("secret"), SECRET).expect("writing the secret");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc/dir")).expect("creating the tree");
        fs::write(root.join("secret"), b"inside").expect("writing a file");
        symlink("/..", root.join("etc/escape")).expect("a symlink");
        symlink("../../", root.join("etc/up")).expect("a symlink");
        symlink("/etc/data", root.join("etc/abs")).expect("a symlink");
        symlink("loop", root.join("etc/loop")).expect("a symlink");
        let data = root.join("etc/data");
        Tree {
            root: fs::File::open(&root).expect("opening the root"),
            _dir: dir,
            data,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (path, contents) = match data.iter().position(|b| *b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let tree = tree();
    fs::write(&tree.data, contents).expect("writing the guest's file");
    match guestfile::read(tree.root.as_fd(), Path::new(path), LIMIT) {
        Ok(read) => {
            assert!(read.len() <= LIMIT);
            // (The fuzzer learns the secret from this very comparison and
            // may write it into the guest's own file: that is no escape.)
            assert!(
                read != SECRET || contents == SECRET,
                "{path:?} read the secret outside the root"
            );
            assert!(
                read == contents || read == b"inside" || read.is_empty(),
                "{path:?} read something not in the tree: {read:?}"
            );
        }
        Err(GuestFileError::TooLarge { limit, .. }) => assert_eq!(limit, LIMIT),
        Err(_) => {}
    }
});
