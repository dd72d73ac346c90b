//! `image import`, `image list`, `image remove`: the image store.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde::Serialize;

use super::{query::since_text, table, CliError};
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Import a tar (plain, gzip, xz, zstd) or an OCI image layout.
    Import(ImportOptions),
    /// List the imported images.
    List(ImageListOptions),
    /// Remove an image no machine uses.
    Remove(ImageRemoveOptions),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// A tar of a tree (compression is detected).
    Tar,
    /// An OCI image layout: a directory, or an uncompressed tar of one.
    Oci,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  mmdebstrap --include=systemd-sysv,dbus bookworm - | rmachinectl image import debian -
  docker export CONTAINER | rmachinectl image import app -
  skopeo copy docker://docker.io/library/alpine:latest oci:/tmp/alpine:latest
  rmachinectl image import alpine /tmp/alpine --ref latest

The import runs in rmachined: the file is handed over on the bus, streamed
(no temporary copy) into <storage-dir>/images/NAME, and checked (sha256 of
every OCI blob). Device nodes are not kept; owners, modes, xattrs and file
capabilities are.")]
pub(crate) struct ImportOptions {
    /// The image's name.
    name: String,
    /// A tar file, an OCI layout directory or tar, or `-` for standard input.
    source: PathBuf,
    /// What the source is; detected from its content when not given.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// The OCI manifest to import, by its tag (org.opencontainers.image.ref.name).
    #[arg(long = "ref", value_name = "TAG")]
    reference: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ImageListOptions {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ImageRemoveOptions {
    /// Images to remove.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

impl ImageCommand {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        match self {
            ImageCommand::Import(options) => options.run(manager).await.map(|()| 0),
            ImageCommand::List(options) => options.run(manager).await.map(|()| 0),
            ImageCommand::Remove(options) => {
                let mut status = 0;
                for name in &options.names {
                    if let Err(error) = manager.remove_image(name).await {
                        super::report(&CliError::from(error));
                        status = 1;
                    }
                }
                Ok(status)
            }
        }
    }
}

/// `12.3M`-style sizes.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

impl ImportOptions {
    async fn run(&self, manager: &ManagerProxy<'static>) -> Result<(), CliError> {
        let file = if self.source.as_os_str() == "-" {
            None
        } else {
            Some(std::fs::File::open(&self.source).map_err(|e| {
                CliError::Failed(format!("cannot open {}: {e}", self.source.display()))
            })?)
        };
        let stdin = std::io::stdin();
        let fd = match &file {
            Some(file) => file.as_fd(),
            None => stdin.as_fd(),
        };
        let format = match self.format {
            None => "",
            Some(FormatArg::Tar) => "tar",
            Some(FormatArg::Oci) => "oci",
        };
        let reference = self.reference.as_deref().unwrap_or("");
        let show = std::io::stderr().is_terminal();
        let mut progress = if show {
            Some(
                manager
                    .receive_import_progress_with_args(&[(0, self.name.as_str())])
                    .await?,
            )
        } else {
            None
        };
        let call = manager.import_image(&self.name, fd.into(), format, reference);
        tokio::pin!(call);
        let mut shown = false;
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                Some(signal) = async {
                    match progress.as_mut() {
                        Some(stream) => stream.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Ok(args) = signal.args() {
                        let (done, total) = (*args.done(), *args.total());
                        let line = if total > 0 {
                            format!(
                                "importing {}: {} of {} ({}%)",
                                self.name,
                                size_text(done),
                                size_text(total),
                                done.min(total) * 100 / total
                            )
                        } else {
                            format!("importing {}: {}", self.name, size_text(done))
                        };
                        eprint!("\r\x1b[K{line}");
                        let _ = std::io::stderr().flush();
                        shown = true;
                    }
                }
            }
        };
        if shown {
            eprint!("\r\x1b[K");
        }
        let (format, bytes, files, devices) = result?;
        println!(
            "Imported image {} ({format}): {files} files, {}.",
            self.name,
            size_text(bytes)
        );
        if devices > 0 {
            println!("{devices} device nodes were not kept (an image holds no devices).");
        }
        Ok(())
    }
}

/// One image, as `image list --json` prints it.
#[derive(Debug, Serialize)]
struct ImageView {
    name: String,
    format: String,
    /// Bytes of regular files.
    size: u64,
    /// Realtime microseconds of the import.
    imported: u64,
    machines: Vec<String>,
}

impl ImageListOptions {
    async fn run(&self, manager: &ManagerProxy<'static>) -> Result<(), CliError> {
        let views: Vec<ImageView> = manager
            .list_images()
            .await?
            .into_iter()
            .map(|(name, format, size, imported, machines)| ImageView {
                name,
                format,
                size,
                imported,
                machines,
            })
            .collect();
        if self.json {
            let text = serde_json::to_string_pretty(&views)
                .map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
            println!("{text}");
            return Ok(());
        }
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.format.clone(),
                    size_text(v.size),
                    since_text(v.imported),
                    v.machines.join(","),
                ]
            })
            .collect();
        let legend = match views.len() {
            1 => "1 image listed.".to_owned(),
            n => format!("{n} images listed."),
        };
        print!(
            "{}",
            table::render(
                &["IMAGE", "FORMAT", "SIZE", "IMPORTED", "MACHINES"],
                &rows,
                &legend
            )
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size_text(0), "0B");
        assert_eq!(size_text(1023), "1023B");
        assert_eq!(size_text(1536), "1.5K");
        assert_eq!(size_text(300 << 20), "300.0M");
    }
}
