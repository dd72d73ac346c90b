//! Checks on untrusted input from the bus, done before any path is built or
//! the manager is asked.

use super::error::Error;

/// Longest argument echoed back in an error sentence.
const ECHO_LIMIT: usize = 64;

/// The SPEC's rule for names, shared with the definition loader.
/// The reason leaves the name out ("it ..."): the caller echoes it bounded,
/// and a name of any length or any escapes must not make the sentence long.
fn check_machine_name(name: &str) -> Result<(), String> {
    crate::definition::validate_name(name).map_err(|err| {
        err.to_string()
            .replacen(&format!("the machine name {name:?} "), "it ", 1)
    })
}

/// Rejects anything that is not a valid machine name with `InvalidArgument`.
pub(crate) fn machine_name(name: &str) -> Result<(), Error> {
    check_machine_name(name).map_err(|reason| {
        Error::InvalidArgument(format!("invalid machine name {}: {reason}", echo(name)))
    })
}

/// Rejects anything that is not a valid image name with `InvalidArgument`.
pub(crate) fn image_name(name: &str) -> Result<(), Error> {
    crate::definition::validate_image_name(name).map_err(|reason| {
        Error::InvalidArgument(format!("invalid image name {}: {reason}", echo(name)))
    })
}

/// An OCI tag: printable, at most 256 bytes.
pub(crate) fn reference(reference: &str) -> Result<(), Error> {
    if reference.len() <= 256 && reference.chars().all(|c| !c.is_control()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid image reference {}: at most 256 printable characters",
            echo(reference)
        )))
    }
}

/// A user inside the machine: empty (root), a uid, or a POSIX-ish user name.
pub(crate) fn user_name(user: &str) -> Result<(), Error> {
    if user.is_empty() || (user.len() <= 10 && user.bytes().all(|b| b.is_ascii_digit())) {
        return Ok(());
    }
    let valid = user.len() <= 32
        && user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid user name {}: use a uid or a name of letters, digits, '_', '-' and '.' (at most 32)",
            echo(user)
        )))
    }
}

/// Most arguments a command may have.
pub(crate) const MAX_ARGUMENTS: usize = 8192;
/// Most environment entries a command may get.
pub(crate) const MAX_ENVIRONMENT: usize = 4096;
/// Most bytes of one argument or entry (the kernel's MAX_ARG_STRLEN less
/// the NUL).
pub(crate) const MAX_STRING: usize = 128 * 1024 - 1;
/// Most bytes of command and environment together: half the usual
/// execve(2) limit (ARG_MAX, 2 MiB), leaving room for what rmachined adds.
pub(crate) const MAX_TOTAL: usize = 1024 * 1024;

/// Bounds a command and its environment before anything else looks at
/// them, in one pass: `TooLarge` names the limit exceeded.
pub(crate) fn command_size(command: &[String], environment: &[String]) -> Result<(), Error> {
    if command.len() > MAX_ARGUMENTS {
        return Err(Error::TooLarge(format!(
            "the command has {} arguments; at most {MAX_ARGUMENTS} are accepted",
            command.len()
        )));
    }
    if environment.len() > MAX_ENVIRONMENT {
        return Err(Error::TooLarge(format!(
            "the environment has {} entries; at most {MAX_ENVIRONMENT} are accepted",
            environment.len()
        )));
    }
    let mut total = 0usize;
    for item in command.iter().chain(environment) {
        if item.len() > MAX_STRING {
            return Err(Error::TooLarge(format!(
                "an argument or environment entry of {} bytes ({}); at most {MAX_STRING} bytes each",
                item.len(),
                echo(item)
            )));
        }
        total += item.len() + 1;
    }
    if total > MAX_TOTAL {
        return Err(Error::TooLarge(format!(
            "command and environment take {total} bytes; at most {MAX_TOTAL} are accepted"
        )));
    }
    Ok(())
}

/// The one check of a command's environment, at the boundary (the D-Bus
/// methods; `rmachinectl shell` checks `--setenv` with it too, before
/// calling): each entry is `KEY=VALUE` with a shell-style KEY (letters,
/// digits and '_', not starting with a digit). Returns the sentence for
/// the first bad entry.
pub(crate) fn check_environment(entries: &[String]) -> Result<(), String> {
    for entry in entries {
        let key = entry.split_once('=').map(|(key, _)| key);
        let valid = key.is_some_and(|key| {
            !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        if !valid {
            return Err(format!(
                "invalid environment entry {}: expected KEY=VALUE with KEY of letters, digits and '_'",
                echo(entry)
            ));
        }
    }
    Ok(())
}

/// [`check_environment`] for a D-Bus method: `InvalidArgument`.
pub(crate) fn environment(entries: &[String]) -> Result<(), Error> {
    check_environment(entries).map_err(Error::InvalidArgument)
}

/// A bounded, escaped rendering of untrusted input for error sentences.
fn echo(input: &str) -> String {
    let shown: String = input.chars().take(ECHO_LIMIT).collect();
    if shown.len() < input.len() {
        format!("{shown:?}... ({} bytes)", input.len())
    } else {
        format!("{shown:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the dbus_args fuzz target: the reason repeated the whole
    /// name, Debug-escaped (a control character grows tenfold), after the
    /// bounded echo.
    #[test]
    fn a_bad_name_is_echoed_once_and_bounded() {
        let name = format!("{}/{}", "\u{1}".repeat(100), "x".repeat(100_000));
        let Err(Error::InvalidArgument(message)) = machine_name(&name) else {
            panic!("accepted");
        };
        assert!(message.len() < 1024, "{} bytes: {message}", message.len());
        assert!(
            message.ends_with("it contains \"/\"; a name is not a path"),
            "{message}"
        );
        let Err(Error::InvalidArgument(message)) = machine_name("Web") else {
            panic!("accepted");
        };
        assert_eq!(
            message,
            "invalid machine name \"Web\": it must start with a lowercase letter or a digit"
        );
    }

    #[test]
    fn machine_names() {
        for good in ["web", "a", "0", "web-1.lan", &"a".repeat(64)] {
            assert!(check_machine_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "..",
            "a..b",
            "-a",
            ".a",
            "Web",
            "a\0b",
            "a b",
            &"a".repeat(65),
            &"a".repeat(10_000),
        ] {
            assert!(check_machine_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn users_and_environment() {
        assert!(user_name("").is_ok());
        assert!(user_name("1000").is_ok());
        assert!(user_name("www-data").is_ok());
        assert!(user_name("../etc").is_err());
        assert!(user_name("a\0").is_err());
        assert!(environment(&["A=1".into(), "B_2=".into()]).is_ok());
        assert!(environment(&["=1".into()]).is_err());
        assert!(environment(&["A".into()]).is_err());
        assert!(environment(&["1A=x".into()]).is_err());
    }

    #[test]
    fn command_sizes_are_bounded() {
        assert!(command_size(&["/bin/true".into()], &["A=1".into()]).is_ok());
        let many = vec!["x".to_owned(); MAX_ARGUMENTS + 1];
        assert!(command_size(&many, &[]).is_err());
        let env = vec!["A=1".to_owned(); MAX_ENVIRONMENT + 1];
        assert!(command_size(&[], &env).is_err());
        assert!(command_size(&["x".repeat(MAX_STRING + 1)], &[]).is_err());
        assert!(command_size(&["x".repeat(MAX_STRING)], &[]).is_ok());
        let big = vec!["x".repeat(MAX_STRING); 9];
        assert!(command_size(&big, &[]).is_err());
        // 200 000 entries are refused at once (linear, no per-entry work).
        let huge = vec!["A=1".to_owned(); 200_000];
        let started = std::time::Instant::now();
        assert!(command_size(&[], &huge).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn echo_is_bounded() {
        let long = "x".repeat(10_000);
        assert!(echo(&long).len() < 100);
        assert_eq!(echo("a\0"), "\"a\\0\"");
    }
}
