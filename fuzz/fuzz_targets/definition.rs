//! The definition parser: TOML text (from a person, or a file someone
//! else may write) into a `Definition` or an error.
//!
//! Invariants: the parse is deterministic; a definition round-trips through
//! its JSON form (the form the daemon hands a supervisor and keeps in state
//! files); an error with a line names a line inside the input and the file.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rmachines::definition::{parse_definition, Definition};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/etc/rmachines/fuzz.toml");
    let parsed = parse_definition("fuzz", file, text);
    match &parsed {
        Ok(definition) => {
            let json = serde_json::to_string(definition).expect("a definition serialises");
            let back: Definition = serde_json::from_str(&json).expect("its JSON parses back");
            assert_eq!(&back, definition, "JSON round trip changed the definition");
            assert_eq!(definition.name, "fuzz");
            assert_eq!(definition.file, file);
        }
        Err(err) => {
            assert_eq!(err.file(), file);
            let message = err.to_string();
            assert!(
                message.starts_with("/etc/rmachines/fuzz.toml"),
                "the error does not name the file: {message}"
            );
            if let Some(line) = err.line() {
                // Lines are 1-based; an error at the very end may point at
                // the line after a final newline.
                let lines = text.bytes().filter(|b| *b == b'\n').count() + 1;
                assert!(
                    (1..=lines).contains(&line),
                    "error line {line} outside the input's {lines} lines: {message}"
                );
                assert!(message.contains(&format!(":{line}")), "{message}");
            }
        }
    }
    let again = parse_definition("fuzz", file, text);
    match (&parsed, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("the same text parsed once and failed once"),
    }
});
