//! User namespace id ranges: which block of host uids/gids a machine's
//! uid 0..size maps to. Ranges are recorded per machine name in
//! `<storage>/idranges.json` so a machine keeps its range across restarts and
//! its files keep their owners.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::definition::{UidBase, Users, ID_BLOCK};
use crate::statefile::{LockedDir, StateFileError};

/// First host id `pick` hands out; below it live system and regular users.
const PICK_START: u32 = 0x0008_0000;
/// End (exclusive) of the ids `pick` hands out; systemd's dynamic ranges and
/// container ranges start above it.
const PICK_END: u32 = 0x6FFF_0000;

const REGISTRY_FILE: &str = "idranges.json";
const LOCK_FILE: &str = "idranges.lock";

/// Ids on the host that are fine to share: `nobody` and `(uid_t) -1`.
const SHAREABLE_IDS: [u32; 2] = [65534, u32::MAX];

/// Host ids `base..base+size` that a machine's ids `0..size` map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub base: u32,
    pub size: u32,
}

impl IdRange {
    /// One past the last id, as u64 so `u32::MAX`-adjacent ranges do not overflow.
    fn end(self) -> u64 {
        u64::from(self.base) + u64::from(self.size)
    }

    fn overlaps(self, start: u64, end: u64) -> bool {
        u64::from(self.base) < end && start < self.end()
    }

    fn describe(self) -> String {
        format!("{}-{}", self.base, self.end() - 1)
    }
}

/// The host files that say which ids are taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdFiles {
    pub passwd: PathBuf,
    pub group: PathBuf,
    pub subuid: PathBuf,
    pub subgid: PathBuf,
}

impl Default for HostIdFiles {
    fn default() -> Self {
        HostIdFiles {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
            subuid: PathBuf::from("/etc/subuid"),
            subgid: PathBuf::from("/etc/subgid"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdRangeError {
    #[error("machine {machine}: cannot {action} {}: {source}; check that the path exists and is writable by rmachined", path.display())]
    Io {
        machine: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("machine {machine}: cannot lock {}: {source}; check that the storage directory is writable by rmachined", path.display())]
    Lock {
        machine: String,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("machine {machine}: {} is not a valid id range registry ({reason}); repair it or move it away (machines with base = \"pick\" then get new ranges and their files' owners must be shifted)", path.display())]
    Registry {
        machine: String,
        path: PathBuf,
        reason: String,
    },
    #[error("machine {machine}: users.base = {base} gives host ids {range}, which overlap {conflict}; choose another base that is a multiple of 65536, or base = \"pick\"")]
    Conflict {
        machine: String,
        base: u32,
        range: String,
        conflict: String,
    },
    #[error("machine {machine}: no free block of {size} host ids is left between {PICK_START} and {PICK_END} (registry {}); release ranges of deleted machines or set users.base", registry.display())]
    Exhausted {
        machine: String,
        size: u32,
        registry: PathBuf,
    },
}

/// One registry entry. Written as `{"base": b, "size": s}`; a bare number
/// (a base with the default size) is read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum RegistryEntry {
    Range(IdRange),
    Base(u32),
}

impl RegistryEntry {
    fn range(self) -> IdRange {
        match self {
            RegistryEntry::Range(range) => range,
            RegistryEntry::Base(base) => IdRange {
                base,
                size: ID_BLOCK,
            },
        }
    }
}

type Registry = BTreeMap<String, RegistryEntry>;

/// A taken span of host ids and what takes it, for error messages.
struct Taken {
    start: u64,
    end: u64,
    what: String,
}

/// Returns the host id range of machine `name`, assigning and recording one
/// when needed. With `base = "pick"` the range is derived from the name and
/// kept for as long as it stays free of conflicts.
pub fn assign_range(
    storage_dir: &Path,
    name: &str,
    users: &Users,
    host: &HostIdFiles,
) -> Result<IdRange, IdRangeError> {
    let store = Store::open(storage_dir, name)?;
    let mut registry = store.read()?;
    let mut taken = host_ids(name, host)?;
    let registry_path = store.registry_path();
    taken.extend(
        registry
            .iter()
            .filter(|(other, _)| *other != name)
            .map(|(other, entry)| {
                let range = entry.range();
                Taken {
                    start: u64::from(range.base),
                    end: range.end(),
                    what: format!(
                        "the range of machine {other} ({}, in {})",
                        range.describe(),
                        registry_path.display()
                    ),
                }
            }),
    );
    let conflict = |range: IdRange| {
        taken
            .iter()
            .find(|t| range.overlaps(t.start, t.end))
            .map(|t| t.what.clone())
    };

    let range = match users.base {
        UidBase::Fixed(base) => {
            let range = IdRange {
                base,
                size: users.size,
            };
            if let Some(conflict) = conflict(range) {
                return Err(IdRangeError::Conflict {
                    machine: name.to_string(),
                    base,
                    range: range.describe(),
                    conflict,
                });
            }
            range
        }
        UidBase::Pick => {
            let registered = registry
                .get(name)
                .map(|entry| IdRange {
                    base: entry.range().base,
                    size: users.size,
                })
                .filter(|range| range.end() <= u64::from(PICK_END) && conflict(*range).is_none());
            match registered {
                Some(range) => range,
                None => {
                    // A new range is also clear of every id a process on the
                    // host runs with (another container manager's ranges,
                    // ids nobody wrote down).
                    let running = running_ids();
                    pick(name, users.size)
                        .find(|range| conflict(*range).is_none() && !runs_in(&running, *range))
                }
                .ok_or_else(|| IdRangeError::Exhausted {
                    machine: name.to_string(),
                    size: users.size,
                    registry: registry_path.clone(),
                })?,
            }
        }
    };

    if registry.get(name).map(|entry| entry.range()) != Some(range) {
        registry.insert(name.to_string(), RegistryEntry::Range(range));
        store.write(&registry)?;
    }
    Ok(range)
}

/// Forgets the range of machine `name`, for when its definition is deleted.
/// Stopping a machine keeps its range.
pub fn release_range(storage_dir: &Path, name: &str) -> Result<(), IdRangeError> {
    let store = Store::open(storage_dir, name)?;
    let mut registry = store.read()?;
    if registry.remove(name).is_some() {
        store.write(&registry)?;
    }
    Ok(())
}

/// FNV-1a, 64 bit: stable across Rust versions and runs, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The candidate ranges for `name`, its natural slot first, then the next
/// slots in order, wrapping around.
fn pick(name: &str, size: u32) -> impl Iterator<Item = IdRange> {
    let slots = if size == 0 || size > PICK_END - PICK_START {
        0
    } else {
        (PICK_END - PICK_START - size) / ID_BLOCK + 1
    };
    let first = if slots == 0 {
        0
    } else {
        fnv1a64(name.as_bytes()) % u64::from(slots)
    };
    (0..u64::from(slots)).map(move |i| {
        let slot = (first + i) % u64::from(slots);
        // slot < slots, so the base stays below PICK_END.
        let base = u64::from(PICK_START) + slot * u64::from(ID_BLOCK);
        IdRange {
            base: u32::try_from(base).unwrap_or(PICK_START),
            size,
        }
    })
}

/// The uid and gid every process on the host runs as: the owner of its
/// `/proc/PID` (its effective ids; for a process that is not dumpable, the
/// root of its user namespace, which is what a container manager's range
/// starts with). One `statx` per process: reading every process's
/// `status` (all four ids, but rendered with its signal masks and
/// capability sets) made each first start cost more the more machines ran.
fn running_ids() -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut ids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return ids;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        ids.extend(
            [meta.uid(), meta.gid()]
                .into_iter()
                .filter(|id| !SHAREABLE_IDS.contains(id))
                .map(u64::from),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether one of the sorted `ids` falls in `range`.
fn runs_in(ids: &[u64], range: IdRange) -> bool {
    let first = ids.partition_point(|id| *id < u64::from(range.base));
    ids.get(first).is_some_and(|id| *id < range.end())
}

/// Ids the host already uses: sub-id ranges and the uids/gids of its users
/// and groups. Missing files are empty.
fn host_ids(machine: &str, host: &HostIdFiles) -> Result<Vec<Taken>, IdRangeError> {
    let mut taken = Vec::new();
    for path in [&host.subuid, &host.subgid] {
        for line in read_lines(machine, path)? {
            let mut fields = line.split(':');
            let (Some(owner), Some(start), Some(count)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(start), Ok(count)) = (start.trim().parse::<u64>(), count.trim().parse::<u64>())
            else {
                continue;
            };
            taken.push(Taken {
                start,
                end: start + count,
                what: format!(
                    "the sub-id range of {owner} ({}, in {})",
                    line.trim(),
                    path.display()
                ),
            });
        }
    }
    for (path, field, kind) in [(&host.passwd, 2, "user"), (&host.group, 2, "group")] {
        for line in read_lines(machine, path)? {
            let fields: Vec<&str> = line.split(':').collect();
            let Some(id) = fields.get(field).and_then(|f| f.trim().parse::<u32>().ok()) else {
                continue;
            };
            if SHAREABLE_IDS.contains(&id) {
                continue;
            }
            taken.push(Taken {
                start: u64::from(id),
                end: u64::from(id) + 1,
                what: format!("{kind} {} (id {id}, in {})", fields[0], path.display()),
            });
        }
        // A user's primary gid counts as taken too.
        if kind == "user" {
            for line in read_lines(machine, path)? {
                let fields: Vec<&str> = line.split(':').collect();
                let Some(gid) = fields.get(3).and_then(|f| f.trim().parse::<u32>().ok()) else {
                    continue;
                };
                if SHAREABLE_IDS.contains(&gid) {
                    continue;
                }
                taken.push(Taken {
                    start: u64::from(gid),
                    end: u64::from(gid) + 1,
                    what: format!(
                        "the primary group of user {} (gid {gid}, in {})",
                        fields[0],
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(taken)
}

fn read_lines(machine: &str, path: &Path) -> Result<Vec<String>, IdRangeError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(IdRangeError::Io {
            machine: machine.to_string(),
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The registry, held under an exclusive lock for as long as this lives.
struct Store {
    locked: LockedDir,
    machine: String,
}

impl Store {
    fn open(dir: &Path, machine: &str) -> Result<Store, IdRangeError> {
        let locked = LockedDir::lock(dir, LOCK_FILE).map_err(|e| match e.action {
            "lock" => IdRangeError::Lock {
                machine: machine.to_string(),
                path: e.path,
                source: nix::errno::Errno::from_raw(e.source.raw_os_error().unwrap_or(0)),
            },
            action => IdRangeError::Io {
                machine: machine.to_string(),
                action,
                path: e.path,
                source: e.source,
            },
        })?;
        Ok(Store {
            locked,
            machine: machine.to_string(),
        })
    }

    fn registry_path(&self) -> std::path::PathBuf {
        self.locked.path(REGISTRY_FILE)
    }

    fn read(&self) -> Result<Registry, IdRangeError> {
        self.locked
            .read_json(REGISTRY_FILE)
            .map(|registry| registry.unwrap_or_else(Registry::new))
            .map_err(|e| self.error(e))
    }

    /// Replaced atomically: a crash leaves the old or the new registry,
    /// never half of one.
    fn write(&self, registry: &Registry) -> Result<(), IdRangeError> {
        self.locked
            .write_json(REGISTRY_FILE, registry)
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: StateFileError) -> IdRangeError {
        match e.action {
            "parse" | "serialize" => IdRangeError::Registry {
                machine: self.machine.clone(),
                path: e.path,
                reason: e.source.to_string(),
            },
            action => IdRangeError::Io {
                machine: self.machine.clone(),
                action,
                path: e.path,
                source: e.source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Env {
        dir: tempfile::TempDir,
        host: HostIdFiles,
    }

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let host = HostIdFiles {
                passwd: dir.path().join("passwd"),
                group: dir.path().join("group"),
                subuid: dir.path().join("subuid"),
                subgid: dir.path().join("subgid"),
            };
            fs::write(
                &host.passwd,
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/sbin/nologin\nalice:x:1000:1000::/home/alice:/bin/sh\n",
            )
            .unwrap();
            fs::write(&host.group, "root:x:0:\nnogroup:x:65534:\n").unwrap();
            fs::write(&host.subuid, "alice:100000:65536\n").unwrap();
            Env { dir, host }
        }

        fn storage(&self) -> PathBuf {
            self.dir.path().join("storage")
        }

        fn assign(&self, name: &str, users: Users) -> Result<IdRange, IdRangeError> {
            assign_range(&self.storage(), name, &users, &self.host)
        }
    }

    const PICK: Users = Users {
        base: UidBase::Pick,
        size: ID_BLOCK,
    };

    fn fixed(base: u32) -> Users {
        Users {
            base: UidBase::Fixed(base),
            size: ID_BLOCK,
        }
    }

    fn natural(name: &str, size: u32) -> IdRange {
        pick(name, size).next().unwrap()
    }

    #[test]
    fn a_running_id_inside_a_range_is_found_by_its_sorted_search() {
        let range = IdRange {
            base: 100,
            size: 10,
        };
        assert!(!runs_in(&[], range));
        assert!(!runs_in(&[5, 99, 110, 200], range), "just outside");
        assert!(runs_in(&[5, 100, 200], range), "first id");
        assert!(runs_in(&[109], range), "last id");
        assert!(runs_in(&[1, 2, 105], range));
    }

    #[test]
    fn the_running_ids_scan_is_sorted_and_sees_a_process_of_another_id() {
        use std::os::unix::process::CommandExt;
        let ids = running_ids();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
        if !nix::unistd::geteuid().is_root() {
            return; // cannot start a process as another user
        }
        let id = 3_333_333u32;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .uid(id)
            .gid(id)
            .spawn()
            .expect("sleep as another user");
        let seen = running_ids();
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen.binary_search(&u64::from(id)).is_ok(), "{id} not seen");
    }

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn pick_is_deterministic() {
        let env = Env::new();
        let first = env.assign("web", PICK).unwrap();
        assert_eq!(env.assign("web", PICK).unwrap(), first);
        assert_eq!(first, natural("web", ID_BLOCK));
        assert_eq!(first.base % ID_BLOCK, 0);
        assert!(first.base >= PICK_START && first.end() <= u64::from(PICK_END));

        let fresh = Env::new();
        assert_eq!(fresh.assign("web", PICK).unwrap(), first);
    }

    #[test]
    fn many_names_never_overlap() {
        let env = Env::new();
        let mut ranges: Vec<IdRange> = (0..200)
            .map(|i| {
                let size = if i % 3 == 0 { 2 * ID_BLOCK } else { ID_BLOCK };
                env.assign(
                    &format!("m{i}"),
                    Users {
                        base: UidBase::Pick,
                        size,
                    },
                )
                .unwrap()
            })
            .collect();
        ranges.sort_by_key(|r| r.base);
        for pair in ranges.windows(2) {
            assert!(pair[0].end() <= u64::from(pair[1].base), "{pair:?}");
        }
    }

    #[test]
    fn pick_moves_past_a_colliding_registered_range() {
        let env = Env::new();
        let web = natural("web", ID_BLOCK);
        env.assign("other", fixed(web.base)).unwrap();
        let got = env.assign("web", PICK).unwrap();
        assert_ne!(got.base, web.base);
        assert!(!got.overlaps(u64::from(web.base), web.end()));
    }

    #[test]
    fn subuid_ranges_are_avoided() {
        let env = Env::new();
        let web = natural("web", ID_BLOCK);
        fs::write(
            &env.host.subuid,
            format!("garbage line\nbob:{}:10\nmalformed:x:y\n", web.base + 100),
        )
        .unwrap();
        let got = env.assign("web", PICK).unwrap();
        assert_eq!(got.base, web.base + ID_BLOCK);

        let db = natural("db", ID_BLOCK);
        fs::write(&env.host.subgid, format!("carol:{}:65536\n", db.base)).unwrap();
        assert_ne!(env.assign("db", PICK).unwrap().base, db.base);
    }

    #[test]
    fn host_users_are_avoided_but_nobody_is_shared() {
        let env = Env::new();
        let web = natural("web", ID_BLOCK);
        fs::write(
            &env.host.passwd,
            format!(
                "nobody:x:65534:65534::/:/bin/false\nsvc:x:{}:100::/:/bin/false\n",
                web.base + 5
            ),
        )
        .unwrap();
        assert_ne!(env.assign("web", PICK).unwrap().base, web.base);
        // nobody (65534) sits inside 0..65536, but that is fine to share.
        let env = Env::new();
        fs::write(&env.host.subuid, "").unwrap();
        fs::write(&env.host.passwd, "nobody:x:65534:65534::/:/bin/false\n").unwrap();
        assert_eq!(env.assign("low", fixed(ID_BLOCK)).unwrap().base, ID_BLOCK);
    }

    #[test]
    fn registered_pick_range_is_kept_while_free_and_moved_when_not() {
        let env = Env::new();
        let web = natural("web", ID_BLOCK);
        env.assign("web", PICK).unwrap();
        // A sub-id range appears over the registered one: the machine moves.
        fs::write(&env.host.subuid, format!("dave:{}:65536\n", web.base)).unwrap();
        let moved = env.assign("web", PICK).unwrap();
        assert_ne!(moved.base, web.base);
        // The range goes away again: the machine keeps its new range.
        fs::write(&env.host.subuid, "").unwrap();
        assert_eq!(env.assign("web", PICK).unwrap(), moved);
    }

    #[test]
    fn fixed_conflicts_are_rejected() {
        let env = Env::new();
        // alice's sub-ids 100000..165535 overlap 131072..196607.
        let err = env.assign("web", fixed(2 * ID_BLOCK)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("machine web"), "{message}");
        assert!(message.contains("subuid"), "{message}");
        assert!(message.contains("alice"), "{message}");

        env.assign("db", fixed(10 * ID_BLOCK)).unwrap();
        let err = env.assign("web", fixed(10 * ID_BLOCK)).unwrap_err();
        assert!(matches!(err, IdRangeError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("machine db"), "{err}");
        assert!(err.to_string().contains(REGISTRY_FILE), "{err}");

        // Its own registered range is no conflict.
        assert_eq!(
            env.assign("db", fixed(10 * ID_BLOCK)).unwrap().base,
            10 * ID_BLOCK
        );
        // Root's uid 0 is taken.
        let err = env.assign("zero", fixed(0)).unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
    }

    #[test]
    fn registry_persists_and_releases() {
        let env = Env::new();
        let db = env.assign("db", fixed(20 * ID_BLOCK)).unwrap();
        let web = env.assign("web", PICK).unwrap();
        let text = fs::read_to_string(env.storage().join(REGISTRY_FILE)).unwrap();
        let registry: Registry = serde_json::from_str(&text).unwrap();
        assert_eq!(registry["db"].range(), db);
        assert_eq!(registry["web"].range(), web);

        release_range(&env.storage(), "db").unwrap();
        let registry: Registry =
            serde_json::from_str(&fs::read_to_string(env.storage().join(REGISTRY_FILE)).unwrap())
                .unwrap();
        assert!(!registry.contains_key("db"));
        assert!(registry.contains_key("web"));
        // Released: another machine may now use it.
        assert_eq!(env.assign("other", fixed(20 * ID_BLOCK)).unwrap(), db);
        // Releasing an unknown name, or in a missing directory, is fine.
        release_range(&env.storage(), "nope").unwrap();
        release_range(&env.dir.path().join("absent"), "nope").unwrap();
    }

    #[test]
    fn bare_number_entries_are_read() {
        let env = Env::new();
        fs::create_dir_all(env.storage()).unwrap();
        let web = natural("web", ID_BLOCK);
        fs::write(
            env.storage().join(REGISTRY_FILE),
            format!("{{\"old\": {}}}", web.base),
        )
        .unwrap();
        assert_ne!(env.assign("web", PICK).unwrap().base, web.base);
    }

    #[test]
    fn corrupt_registry_is_reported() {
        let env = Env::new();
        fs::create_dir_all(env.storage()).unwrap();
        fs::write(env.storage().join(REGISTRY_FILE), "not json").unwrap();
        let err = env.assign("web", PICK).unwrap_err();
        assert!(matches!(err, IdRangeError::Registry { .. }), "{err}");
        assert!(err.to_string().contains(REGISTRY_FILE), "{err}");
    }
}
