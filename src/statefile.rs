//! Small JSON state files shared by processes (the daemon, every machine's
//! supervisor): read and written under an exclusive `flock` on a lock file
//! beside them, replaced atomically (temporary file + rename).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What failed, for the caller's own error type: the step, the path, why.
#[derive(Debug)]
pub struct StateFileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// A directory held under its lock file for as long as this lives.
pub struct LockedDir {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl LockedDir {
    /// Creates `dir` if needed and takes the exclusive lock on `dir/lock_name`.
    pub fn lock(dir: &Path, lock_name: &str) -> Result<LockedDir, StateFileError> {
        let err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateFileError {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(err("create", dir))?;
        let lock_path = dir.join(lock_name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(err("open", &lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| err("lock", &lock_path)(errno.into()))?;
        Ok(LockedDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The file's text, or `None` when it does not exist yet.
    pub fn read(&self, name: &str) -> Result<Option<String>, StateFileError> {
        let path = self.path(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(source) if source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateFileError {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Parses the file as JSON; `None` when it does not exist yet.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateFileError> {
        let Some(text) = self.read(name)? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|err| StateFileError {
                action: "parse",
                path: self.path(name),
                source: io::Error::new(io::ErrorKind::InvalidData, err),
            })
    }

    /// Replaces the file with `value` as JSON, atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateFileError> {
        let path = self.path(name);
        // Compact: registries are read and written whole under their lock
        // at every start, and a thousand machines' pretty JSON was twice
        // the bytes to parse and write (`jq .` shows them readably).
        let text = serde_json::to_vec(value).map_err(|err| StateFileError {
            action: "serialize",
            path: path.clone(),
            source: io::Error::other(err),
        })?;
        write_atomic(&path, &text)
    }
}

/// Writes `data` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateFileError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(|source| StateFileError {
        action: "write",
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, path).map_err(|source| StateFileError {
        action: "rename",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_under_the_lock_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let locked = LockedDir::lock(dir.path(), "x.lock").unwrap();
        assert_eq!(locked.read_json::<Vec<u32>>("x.json").unwrap(), None);
        locked.write_json("x.json", &vec![1u32, 2]).unwrap();
        assert_eq!(
            locked.read_json::<Vec<u32>>("x.json").unwrap(),
            Some(vec![1, 2])
        );
        assert!(!dir.path().join("x.tmp").exists(), "temporary file left");
        fs::write(dir.path().join("x.json"), "{").unwrap();
        assert_eq!(
            locked.read_json::<Vec<u32>>("x.json").unwrap_err().action,
            "parse"
        );
    }
}
