//! Terminal handling for `shell`: raw mode on the caller's tty, window size
//! passed to the pty, and a pipe-friendly pty mode when stdin is no tty.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{
    cfmakeraw, tcgetattr, tcsetattr, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices,
    Termios,
};

nix::ioctl_read_bad!(get_window_size, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(set_window_size, libc::TIOCSWINSZ, libc::winsize);

/// Puts stdin's terminal in raw mode; the previous mode comes back when this
/// is dropped (every return path of `shell`, including its signal handling).
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub(crate) fn enter() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

pub(crate) fn stdin_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

pub(crate) fn stdout_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// Copies the window size of terminal `from` to the pty `to`.
pub(crate) fn copy_window_size(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer (tty_ioctl(4)),
    // which points at a live, properly aligned local; the fd is borrowed and open.
    unsafe { get_window_size(from.as_raw_fd(), &mut size) }?;
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer (tty_ioctl(4));
    // it points at the initialised local above; the fd is borrowed and open.
    unsafe { set_window_size(to.as_raw_fd(), &size) }?;
    Ok(())
}

/// Prepares the pty for piped input and output: no echo (the input is not
/// sent back) and no output processing (`\n` stays `\n`), while keeping the
/// canonical mode so the EOF character ends the command's input. Returns
/// that EOF character.
pub(crate) fn pipe_mode(pty: BorrowedFd<'_>) -> nix::Result<u8> {
    let mut mode = tcgetattr(pty)?;
    mode.local_flags
        .remove(LocalFlags::ECHO | LocalFlags::ECHONL | LocalFlags::ECHOE | LocalFlags::ECHOK);
    mode.output_flags.remove(OutputFlags::OPOST);
    tcsetattr(pty, SetArg::TCSANOW, &mode)?;
    Ok(mode.control_chars[SpecialCharacterIndices::VEOF as usize])
}
