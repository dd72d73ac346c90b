//! The bus boundary's checks of untrusted arguments: machine names, users,
//! commands and environments (src/dbus/validate.rs, through
//! `rmachines::fuzzing`).
//!
//! The input is NUL-separated fields: name, user, then the command's
//! arguments up to an empty field, then environment entries.
//!
//! Invariants: an accepted name is one the definition loader accepts and
//! makes a valid object path; an accepted user cannot smuggle a passwd
//! field separator; error sentences stay short whatever the input; and the
//! checks take time linear in the input (a budget per byte).
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rmachines::fuzzing;

/// Longest error sentence: the checks echo at most 64 characters.
const MAX_ERROR: usize = 1024;

fn check(name: &str, user: &str, command: &[String], environment: &[String]) {
    if fuzzing::dbus_machine_name(name).is_ok() {
        rmachines::definition::validate_name(name).expect("the loader accepts the bus's names");
        let path = rmachines::dbus::machine_path(name);
        assert!(
            path.as_str().starts_with("/org/rmachines1/machine/"),
            "{path}"
        );
    }
    match fuzzing::dbus_user_name(user) {
        Ok(()) => assert!(
            user.len() <= 32 && !user.contains([':', '/', '\n', ',']),
            "{user:?}"
        ),
        Err(e) => assert!(e.len() <= MAX_ERROR, "{} bytes of error", e.len()),
    }
    match fuzzing::dbus_command(command, environment) {
        Ok(()) => {
            for entry in environment {
                let (key, _) = entry.split_once('=').expect("accepted entries have a '='");
                assert!(!key.is_empty() && !key.contains('\0'), "{entry:?}");
            }
        }
        Err(e) => assert!(e.len() <= MAX_ERROR, "{} bytes of error", e.len()),
    }
    if let Err(e) = fuzzing::dbus_machine_name(name) {
        assert!(e.len() <= MAX_ERROR, "{} bytes of error", e.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\0');
    let name = fields.next().unwrap_or_default();
    let user = fields.next().unwrap_or_default();
    let mut command = Vec::new();
    for field in fields.by_ref() {
        if field.is_empty() {
            break;
        }
        command.push(field.to_owned());
    }
    let environment: Vec<String> = fields.map(str::to_owned).collect();

    // Linear time: a generous budget per byte (sanitizers, a loaded shared
    // machine), judged on the best of three runs so that one preemption is
    // not a finding.
    let budget = Duration::from_millis(20) + Duration::from_micros(2) * data.len() as u32;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        check(name, user, &command, &environment);
        best = best.min(start.elapsed());
        if best <= budget {
            break;
        }
    }
    assert!(
        best <= budget,
        "{} bytes took {best:?} (budget {budget:?})",
        data.len()
    );
});
