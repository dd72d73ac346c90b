//! The guest's /etc/passwd and /etc/group, as `rmachinectl shell USER` and
//! Execute read them (`enter::parse_user`, then `enter::check_ids`).
//!
//! The input is three NUL-separated fields: passwd text, group text, the
//! user asked for.
//!
//! Invariants: a user found is the one asked for (by name or uid, empty is
//! root), with a home and shell taken from one passwd line, groups the
//! group file lists it in, and `check_ids` refuses every id outside the
//! machine's range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rmachines::runtime::enter::{check_ids, parse_user};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.splitn(3, '\0');
    let passwd = fields.next().unwrap_or_default();
    let group = fields.next().unwrap_or_default();
    let asked = fields.next().unwrap_or_default();
    let Ok(user) = parse_user(passwd, group, asked) else {
        return;
    };
    let asked = if asked.is_empty() { "root" } else { asked };
    assert!(
        user.name == asked || user.uid.to_string() == asked || asked.parse() == Ok(user.uid),
        "asked {asked:?}, got {user:?}"
    );
    assert!(!user.name.contains([':', '\n']), "{user:?}");
    assert!(!user.shell.is_empty());
    assert!(
        passwd.lines().any(|l| {
            let f: Vec<&str> = l.split(':').collect();
            f.len() >= 7 && f[0] == user.name && f[5] == user.home
        }),
        "{user:?} from no passwd line"
    );
    for size in [0u32, 1, 1000, 65536, u32::MAX] {
        let all = [user.uid, user.gid]
            .into_iter()
            .chain(user.groups.iter().copied());
        let inside = all.clone().all(|id| id < size);
        assert_eq!(
            check_ids(&user, size).is_ok(),
            inside,
            "{user:?} size {size}"
        );
    }
});
