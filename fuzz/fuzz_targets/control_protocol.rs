//! The supervisor's control protocol (src/runtime/protocol.rs): the
//! commands a supervisor decodes from a client and the statuses a client
//! decodes from a supervisor, newline-delimited JSON over a socket.
//!
//! The bytes go through the real blocking `Client` (over a socketpair) and
//! through the supervisor's own decoding of a line into a `Command`.
//!
//! Invariants: whatever decodes re-encodes to something that decodes to
//! the same value; the client returns only statuses and ends cleanly.
#![no_main]
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rmachines::runtime::protocol::{decode_line, encode_line, Client, Command, Status};

fuzz_target!(|data: &[u8]| {
    // The supervisor's side: every complete line a client sent.
    for line in data.split_inclusive(|b| *b == b'\n') {
        if let Ok(command) = decode_line::<Command>(line) {
            let json = encode_line(&command).expect("a command encodes");
            let back: Command = decode_line(&json).expect("and decodes");
            assert_eq!(back, command);
        }
        if let Ok(status) = decode_line::<Status>(line) {
            let json = encode_line(&status).expect("a status encodes");
            let back: Status = decode_line(&json).expect("and decodes");
            assert_eq!(back, status);
        }
    }

    // The client's side, through the real reader.
    let Ok((mut supervisor, client)) = UnixStream::pair() else {
        return;
    };
    if data.len() > 60_000 {
        return; // more than a socket buffer: the write would block
    }
    supervisor
        .write_all(data)
        .expect("the socket buffer holds the input");
    drop(supervisor);
    let mut client = Client::from_stream(client).expect("a client on a socketpair");
    let mut statuses = 0;
    loop {
        match client.next(Duration::from_millis(100)) {
            Ok(Some(status)) => {
                statuses += 1;
                assert_eq!(client.last.as_ref(), Some(&status));
                assert!(statuses <= data.len(), "more statuses than bytes");
            }
            Ok(None) => break,
            // A line that is not a status (or not UTF-8) is an error, which
            // ends the client's use of the connection.
            Err(_) => break,
        }
    }
});
