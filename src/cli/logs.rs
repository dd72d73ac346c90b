//! `logs`: the machine's console output, read through rmachined
//! (`OpenConsoleLog`, authorised like `Shell`): the rotated part
//! (`console.log.1`) and the current `console.log`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use clap::Args;

use super::CliError;
use crate::dbus::proxy::ManagerProxy;

#[derive(Debug, Args)]
pub(crate) struct LogsOptions {
    /// The machine.
    name: String,
    /// Keep printing what the machine writes (until interrupted).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Print only the last LINES lines.
    #[arg(short = 'n', long = "lines", value_name = "LINES")]
    lines: Option<usize>,
}

/// How often `-f` looks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// After this many quiet intervals `-f` asks rmachined again, to notice a
/// rotated or recreated log.
const REOPEN_EVERY: u32 = 5;

impl LogsOptions {
    pub(crate) async fn run(&self, manager: &ManagerProxy<'static>) -> Result<i32, CliError> {
        let mut logs = open(manager, &self.name).await?;
        let mut stdout = std::io::stdout().lock();
        let mut text = Vec::new();
        for log in &mut logs {
            log.read_to_end(&mut text)?;
        }
        let shown = match self.lines {
            Some(n) => last_lines(&text, n),
            None => &text[..],
        };
        if write_out(&mut stdout, shown).is_err() {
            return Ok(0);
        }
        if !self.follow {
            return Ok(0);
        }
        // Read to its end above: following goes on from there (None: the
        // machine never ran yet, the first log is waited for).
        let current = logs.pop();
        self.follow_from(manager, current, &mut stdout).await
    }

    async fn follow_from(
        &self,
        manager: &ManagerProxy<'static>,
        mut current: Option<File>,
        stdout: &mut impl Write,
    ) -> Result<i32, CliError> {
        let mut quiet = 0;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let mut wrote = false;
            if let Some(log) = current.as_mut() {
                // Truncated (the machine booted again): from the start.
                let position = log.stream_position()?;
                if log.metadata()?.len() < position {
                    log.seek(SeekFrom::Start(0))?;
                }
                loop {
                    let n = log.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    wrote = true;
                    if write_out(stdout, &buffer[..n]).is_err() {
                        return Ok(0);
                    }
                }
            }
            if wrote {
                quiet = 0;
            } else {
                quiet += 1;
            }
            if quiet >= REOPEN_EVERY {
                quiet = 0;
                let mut fresh = open(manager, &self.name).await?;
                if let Some(newest) = fresh.pop() {
                    let same = match &current {
                        Some(log) => same_file(log, &newest)?,
                        None => false,
                    };
                    if !same {
                        // Rotated: what the old file got last is read
                        // above; the new one is read from its start.
                        current = Some(newest);
                        continue;
                    }
                }
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    }
}

async fn open(manager: &ManagerProxy<'static>, name: &str) -> Result<Vec<File>, CliError> {
    Ok(manager
        .open_console_log(name)
        .await?
        .into_iter()
        .map(|fd| File::from(OwnedFd::from(fd)))
        .collect())
}

fn same_file(a: &File, b: &File) -> Result<bool, CliError> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Writes and flushes; an error means our reader is gone.
fn write_out(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    out.flush()
}

/// The tail of `text` holding its last `n` lines (a last line without its
/// newline counts).
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (index, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == n {
                return &text[index + 1..];
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_counts_from_the_end() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }
}
