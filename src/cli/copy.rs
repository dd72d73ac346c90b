//! `cp`: copies a file or a tree into or out of a running machine.
//!
//! The machine's side runs in the machine, as its root, through `Execute`:
//! a `tar` of the guest (busybox or GNU) reads or writes the guest's files
//! in the machine's own mount namespace, so every path there is resolved by
//! the guest's view (a guest symlink never leads to a host file), and
//! ownership is the guest's own. The host's side is the host's GNU `tar`.
//! The archive flows through a pipe between the two; rmachined never sees
//! the bytes. The guest needs `sh`, `tar`, `mkdir`, `mktemp`, `mv` and `rm`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Args;

use super::shell::execute;
use super::CliError;
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Args)]
pub(crate) struct CopyOptions {
    /// What to copy: a host path or MACHINE:/PATH.
    source: String,
    /// Where to: a host path or MACHINE:/PATH (an existing directory
    /// receives the source under its own name).
    destination: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    Host(PathBuf),
    Machine { name: String, path: String },
}

/// `MACHINE:/PATH` when the part before the first `:` is a machine name
/// (no `/`); everything else is a host path (`./a:b` to name such a file).
fn parse_location(text: &str) -> Result<Location, CliError> {
    match text.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            crate::definition::validate_name(name).map_err(|err| {
                CliError::Failed(format!(
                    "{text:?}: {name:?} is no machine name ({err}); write ./{text} for a host file"
                ))
            })?;
            if !path.starts_with('/') {
                return Err(CliError::Failed(format!(
                    "{text:?}: the path in machine {name} must be absolute"
                )));
            }
            Ok(Location::Machine {
                name: name.to_owned(),
                path: path.to_owned(),
            })
        }
        _ => Ok(Location::Host(PathBuf::from(text))),
    }
}

/// Copying in: extract into DST when it is a directory, else next to DST
/// in a fresh directory, then rename the one entry to DST.
const EXTRACT_IN_MACHINE: &str = r#"set -e
dst=$1 name=$2
if [ -d "$dst" ]; then exec tar -C "$dst" --numeric-owner -xpf -; fi
parent=${dst%/*}
tmp=$(mktemp -d "${parent:-/}/.rmachines-cp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar -C "$tmp" --numeric-owner -xpf -
mv -f "$tmp/$name" "$dst"
"#;

/// Copying out: one entry, the source itself (a symlink stays a symlink).
const ARCHIVE_IN_MACHINE: &str = r#"set -e
src=$1
parent=${src%/*}
cd "${parent:-/}"
exec tar --numeric-owner -cf - "${src##*/}"
"#;

impl CopyOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        match (
            parse_location(&self.source)?,
            parse_location(&self.destination)?,
        ) {
            (Location::Host(source), Location::Machine { name, path }) => {
                copy_in(manager, &source, &name, &path).await
            }
            (Location::Machine { name, path }, Location::Host(destination)) => {
                copy_out(manager, &name, &path, &destination).await
            }
            _ => Err(CliError::Failed(
                "one of SOURCE and DESTINATION must be MACHINE:/PATH, the other a host path".into(),
            )),
        }
    }
}

/// The last component of `path`, which must have one.
fn entry_name(path: &str) -> Result<&str, CliError> {
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(CliError::Failed(format!(
            "{path:?} names no file: give the path of a file or directory"
        )));
    }
    Ok(name)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), CliError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CliError::Failed(format!("creating a pipe: {e}")))
}

fn tar_failed(status: std::process::ExitStatus) -> CliError {
    CliError::Failed(format!("tar on the host failed ({status})"))
}

/// Ends a transfer: the machine's side (`status`, its exit status) and the
/// host's `tar` must both have succeeded; a failed call kills the host's.
fn finish_transfer(
    status: Result<i32, CliError>,
    tar: &mut std::process::Child,
    what: impl FnOnce() -> String,
) -> Result<(), CliError> {
    let status = match status {
        Ok(status) => status,
        Err(err) => {
            let _ = tar.kill();
            let _ = tar.wait();
            return Err(err);
        }
    };
    let host = tar.wait()?;
    if status != 0 {
        return Err(CliError::Failed(format!(
            "{} failed (exit status {status})",
            what()
        )));
    }
    if !host.success() {
        return Err(tar_failed(host));
    }
    Ok(())
}

async fn copy_in(
    manager: &ManagerProxy<'static>,
    source: &Path,
    machine: &str,
    destination: &str,
) -> Result<i32, CliError> {
    let source_text = source.to_string_lossy();
    let name = entry_name(&source_text)?.to_owned();
    std::fs::symlink_metadata(source)
        .map_err(|e| CliError::Failed(format!("{}: {e}", source.display())))?;
    let parent = match source.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let destination = destination.trim_end_matches('/');
    let destination = if destination.is_empty() {
        "/"
    } else {
        destination
    };
    let (read, write) = pipe()?;
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&parent)
        .args(["--numeric-owner", "-cf", "-", "--"])
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .spawn()
        .map_err(|e| CliError::Failed(format!("running tar on the host: {e}")))?;
    let stderr = std::io::stderr();
    let null = std::fs::File::open("/dev/null")?;
    let status = execute(
        manager,
        machine,
        "",
        &[
            "/bin/sh",
            "-c",
            EXTRACT_IN_MACHINE,
            "sh",
            destination,
            &name,
        ],
        &[],
        [read.as_fd(), null.as_fd(), stderr.as_fd()],
    )
    .await;
    drop(read);
    finish_transfer(status, &mut tar, || {
        format!("extracting in machine {machine}")
    })?;
    Ok(0)
}

async fn copy_out(
    manager: &ManagerProxy<'static>,
    machine: &str,
    source: &str,
    destination: &Path,
) -> Result<i32, CliError> {
    let name = entry_name(source)?.to_owned();
    let source = source.trim_end_matches('/');
    // Into an existing directory under the source's name, else as the
    // destination itself. Extracted into a fresh directory beside the
    // target first: the archive comes from the guest and is not trusted
    // to hold only that one entry.
    let (directory, final_path) = if destination.is_dir() {
        (destination.to_path_buf(), destination.join(&name))
    } else {
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, destination.to_path_buf())
    };
    let staging = tempfile::Builder::new()
        .prefix(".rmachines-cp.")
        .tempdir_in(&directory)
        .map_err(|e| {
            CliError::Failed(format!(
                "creating a directory in {}: {e}",
                directory.display()
            ))
        })?;
    let (read, write) = pipe()?;
    // GNU tar refuses members with `..` or a leading `/`, and creates the
    // archive's symlinks only after every file (so none is followed).
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(staging.path())
        .args(["--numeric-owner", "-xpf", "-"])
        .stdin(Stdio::from(read))
        .spawn()
        .map_err(|e| CliError::Failed(format!("running tar on the host: {e}")))?;
    let stderr = std::io::stderr();
    let null = std::fs::File::open("/dev/null")?;
    let status = execute(
        manager,
        machine,
        "",
        &["/bin/sh", "-c", ARCHIVE_IN_MACHINE, "sh", source],
        &[],
        [null.as_fd(), write.as_fd(), stderr.as_fd()],
    )
    .await;
    drop(write);
    finish_transfer(status, &mut tar, || {
        format!("reading {source} in machine {machine}")
    })?;
    let extracted = staging.path().join(&name);
    std::fs::symlink_metadata(&extracted)
        .map_err(|_| CliError::Failed(format!("machine {machine} sent no {name:?}")))?;
    std::fs::rename(&extracted, &final_path).map_err(|e| {
        CliError::Failed(format!("moving the copy to {}: {e}", final_path.display()))
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("web:/etc/hosts").unwrap(),
            Location::Machine {
                name: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            parse_location("/tmp/a:b").unwrap(),
            Location::Host("/tmp/a:b".into())
        );
        assert_eq!(
            parse_location("./a:b").unwrap(),
            Location::Host("./a:b".into())
        );
        assert_eq!(
            parse_location("plain").unwrap(),
            Location::Host("plain".into())
        );
        assert!(parse_location("web:relative").is_err());
        assert!(parse_location("Bad_Name:/x").is_err());
    }

    #[test]
    fn entry_names() {
        assert_eq!(entry_name("/a/b").unwrap(), "b");
        assert_eq!(entry_name("/a/b/").unwrap(), "b");
        assert_eq!(entry_name("b").unwrap(), "b");
        assert!(entry_name("/").is_err());
        assert!(entry_name("/a/..").is_err());
    }
}
