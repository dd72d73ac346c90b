//! Address assignment: `address = "auto"` gets a free address of the
//! subnet, derived from the machine's name and kept in
//! `<storage>/addresses.json` (flock + atomic rename, like the id ranges) so a
//! machine has the same address across restarts and daemon restarts.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Ipv4Cidr, Ipv6Cidr, NetworkConfig, NetworkError};
use crate::definition::AddressSpec;
use crate::statefile::{LockedDir, StateFileError};

const REGISTRY_FILE: &str = "addresses.json";
const LOCK_FILE: &str = "addresses.lock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Assigned {
    ipv4: Ipv4Cidr,
    ipv6: Option<Ipv6Cidr>,
}

type Registry = BTreeMap<String, Assigned>;

/// FNV-1a, 64 bit: stable across Rust versions and runs.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash: u64, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Returns (and records) the machine's IPv4 address and, when the daemon
/// has an IPv6 subnet, its IPv6 address (the same host number in the ULA).
pub fn assign(
    storage_dir: &Path,
    machine: &str,
    spec: AddressSpec,
    config: &NetworkConfig,
) -> Result<(Ipv4Cidr, Option<Ipv6Cidr>), NetworkError> {
    let store = Store::open(storage_dir, machine)?;
    let mut registry = store.read()?;
    let subnet = config.ipv4_subnet;
    let invalid = |reason: String| NetworkError::Invalid {
        machine: machine.to_owned(),
        key: "network.address",
        reason,
    };
    let owner_v4 = |addr: Ipv4Addr| {
        registry
            .iter()
            .find(|(name, a)| name.as_str() != machine && a.ipv4.addr == addr)
            .map(|(name, _)| name.clone())
    };
    let reserved = |addr: Ipv4Addr| {
        addr == subnet.network() || addr == config.gateway_v4() || addr == subnet.broadcast()
    };
    let v6_for = |v4: Ipv4Addr| {
        config.ipv6_subnet.map(|s6| Ipv6Cidr {
            addr: s6.nth(u128::from(
                u32::from(v4).wrapping_sub(u32::from(subnet.network())),
            )),
            prefix: s6.prefix,
        })
    };
    let pick_v4 = |registry: &Registry| -> Result<Ipv4Cidr, NetworkError> {
        let kept = registry.get(machine).map(|a| a.ipv4).filter(|a| {
            a.prefix == subnet.prefix
                && subnet.contains(a.addr)
                && !reserved(a.addr)
                && owner_v4(a.addr).is_none()
        });
        if let Some(kept) = kept {
            return Ok(kept);
        }
        let hosts = subnet.size().saturating_sub(3);
        if hosts == 0 {
            return Err(NetworkError::Config(format!(
                "subnet {subnet} has no room for machines; use a prefix of /30 or shorter"
            )));
        }
        let start = (fnv1a64(machine.as_bytes()) % u64::from(hosts)) as u32;
        (0..hosts)
            .map(|i| subnet.nth(2 + (start + i) % hosts))
            .find(|addr| !reserved(*addr) && owner_v4(*addr).is_none())
            .map(|addr| Ipv4Cidr {
                addr,
                prefix: subnet.prefix,
            })
            .ok_or_else(|| {
                invalid(format!(
                    "no free address is left in {subnet} (see {}); remove unused entries or \
                     configure a larger subnet",
                    store.registry_path().display()
                ))
            })
    };

    let assigned = match spec {
        AddressSpec::Auto => {
            let ipv4 = pick_v4(&registry)?;
            Assigned {
                ipv4,
                ipv6: v6_for(ipv4.addr),
            }
        }
        AddressSpec::Cidr(IpAddr::V4(addr), prefix) => {
            if !subnet.contains(addr) || prefix < subnet.prefix {
                return Err(invalid(format!(
                    "{addr}/{prefix} is not inside the machines' subnet {subnet}; choose an \
                     address in it (with a prefix of /{} or longer) or \"auto\"",
                    subnet.prefix
                )));
            }
            if reserved(addr) {
                return Err(invalid(format!(
                    "{addr} is the network, gateway or broadcast address of {subnet}; choose \
                     another address or \"auto\""
                )));
            }
            if let Some(owner) = owner_v4(addr) {
                return Err(invalid(format!(
                    "{addr} is already taken by machine {owner}; choose another address or \"auto\""
                )));
            }
            Assigned {
                ipv4: Ipv4Cidr { addr, prefix },
                ipv6: v6_for(addr),
            }
        }
        AddressSpec::Cidr(IpAddr::V6(addr), prefix) => {
            let Some(s6) = config.ipv6_subnet else {
                return Err(invalid(format!(
                    "{addr}/{prefix} is IPv6, but rmachined has no IPv6 subnet configured; use an \
                     IPv4 address or \"auto\""
                )));
            };
            if !s6.contains(addr) || prefix < s6.prefix || addr == s6.nth(1) || addr == s6.nth(0) {
                return Err(invalid(format!(
                    "{addr}/{prefix} is not a machine address inside the machines' IPv6 subnet \
                     {s6}; choose another address or \"auto\""
                )));
            }
            if let Some((owner, _)) = registry.iter().find(|(name, a)| {
                name.as_str() != machine && a.ipv6.is_some_and(|v6| v6.addr == addr)
            }) {
                return Err(invalid(format!(
                    "{addr} is already taken by machine {owner}; choose another address or \"auto\""
                )));
            }
            Assigned {
                ipv4: pick_v4(&registry)?,
                ipv6: Some(Ipv6Cidr { addr, prefix }),
            }
        }
    };
    if registry.get(machine) != Some(&assigned) {
        registry.insert(machine.to_owned(), assigned);
        store.write(&registry)?;
    }
    Ok((assigned.ipv4, assigned.ipv6))
}

/// Forgets a machine's addresses (for a deleted definition).
pub fn release(storage_dir: &Path, machine: &str) -> Result<(), NetworkError> {
    let store = Store::open(storage_dir, machine)?;
    let mut registry = store.read()?;
    if registry.remove(machine).is_some() {
        store.write(&registry)?;
    }
    Ok(())
}

/// How long a passed [`check_host_routes`] stands for the next starts.
/// The host's IPv6 routing table has entries for every machine's veth, and
/// reading it (a walk of the whole table by the kernel) at each start made
/// starts slower the more machines ran; machines started together share
/// one check. A route added meanwhile is found at the first start after.
const ROUTES_CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Fails when a host route (other than the managed bridge's own) overlaps
/// the machines' subnets: machines there would shadow or be shadowed by it.
pub fn check_host_routes(config: &NetworkConfig) -> Result<(), NetworkError> {
    use std::sync::Mutex;
    use std::time::Instant;
    static PASSED: Mutex<Option<(Instant, String)>> = Mutex::new(None);
    let key = format!(
        "{} {} {:?}",
        config.bridge, config.ipv4_subnet, config.ipv6_subnet
    );
    let fresh = |passed: &Option<(Instant, String)>| {
        passed
            .as_ref()
            .is_some_and(|(at, k)| *k == key && at.elapsed() < ROUTES_CHECK_TTL)
    };
    if fresh(&PASSED.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(());
    }
    scan_host_routes(config)?;
    *PASSED.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), key));
    Ok(())
}

fn scan_host_routes(config: &NetworkConfig) -> Result<(), NetworkError> {
    let route_err = |what: String| {
        NetworkError::Config(format!(
            "the machines' subnet overlaps the host route {what}; configure another subnet \
             for rmachined (the IPv4 default is 10.213.0.0/16)"
        ))
    };
    if let Ok(text) = fs::read_to_string("/proc/net/route") {
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] == config.bridge {
                continue;
            }
            let (Ok(dest), Ok(mask)) =
                (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
            else {
                continue;
            };
            if mask == 0 {
                continue;
            }
            let route = Ipv4Cidr {
                addr: Ipv4Addr::from(u32::from_be(dest)),
                prefix: u32::from_be(mask).leading_ones() as u8,
            };
            if route.overlaps(config.ipv4_subnet) {
                return Err(route_err(format!(
                    "{route} dev {} (subnet {})",
                    f[0], config.ipv4_subnet
                )));
            }
        }
    }
    if let (Some(s6), Ok(text)) = (
        config.ipv6_subnet,
        fs::read_to_string("/proc/net/ipv6_route"),
    ) {
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9] == config.bridge || f[9] == "lo" {
                continue;
            }
            let (Ok(dest), Ok(prefix)) =
                (u128::from_str_radix(f[0], 16), u8::from_str_radix(f[1], 16))
            else {
                continue;
            };
            if prefix == 0 {
                continue;
            }
            let route = Ipv6Cidr {
                addr: Ipv6Addr::from(dest),
                prefix,
            };
            if route.overlaps(s6) {
                return Err(route_err(format!("{route} dev {} (subnet {s6})", f[9])));
            }
        }
    }
    Ok(())
}

/// The address registry, held under its lock for as long as this lives.
struct Store {
    locked: LockedDir,
    machine: String,
}

impl Store {
    fn io_error(machine: &str, e: StateFileError) -> NetworkError {
        NetworkError::Io {
            machine: machine.to_owned(),
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }

    fn open(dir: &Path, machine: &str) -> Result<Store, NetworkError> {
        let locked = LockedDir::lock(dir, LOCK_FILE).map_err(|e| Self::io_error(machine, e))?;
        Ok(Store {
            locked,
            machine: machine.to_owned(),
        })
    }

    fn registry_path(&self) -> std::path::PathBuf {
        self.locked.path(REGISTRY_FILE)
    }

    fn read(&self) -> Result<Registry, NetworkError> {
        match self.locked.read_json(REGISTRY_FILE) {
            Ok(registry) => Ok(registry.unwrap_or_else(Registry::new)),
            Err(e) if e.action == "parse" => Err(NetworkError::Config(format!(
                "{} is not a valid address registry ({}); repair it or move it away \
                 (machines then get new addresses)",
                e.path.display(),
                e.source
            ))),
            Err(e) => Err(Self::io_error(&self.machine, e)),
        }
    }

    fn write(&self, registry: &Registry) -> Result<(), NetworkError> {
        self.locked
            .write_json(REGISTRY_FILE, registry)
            .map_err(|e| Self::io_error(&self.machine, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig {
            ipv4_subnet: "10.99.0.0/24".parse().unwrap(),
            ..NetworkConfig::default()
        }
    }

    #[test]
    fn auto_is_stable_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let a = assign(dir.path(), "a", AddressSpec::Auto, &config).unwrap();
        assert_eq!(
            assign(dir.path(), "a", AddressSpec::Auto, &config).unwrap(),
            a
        );
        let mut seen = vec![a.0.addr];
        for i in 0..100 {
            let (v4, v6) =
                assign(dir.path(), &format!("m{i}"), AddressSpec::Auto, &config).unwrap();
            assert!(config.ipv4_subnet.contains(v4.addr));
            assert!(!seen.contains(&v4.addr), "{v4} twice");
            assert_ne!(v4.addr, config.gateway_v4());
            assert!(v6.is_some());
            seen.push(v4.addr);
        }
        // A fresh registry gives the same first address (derived from the name).
        let other = tempfile::tempdir().unwrap();
        assert_eq!(
            assign(other.path(), "a", AddressSpec::Auto, &config).unwrap(),
            a
        );
        release(dir.path(), "a").unwrap();
    }

    #[test]
    fn explicit_addresses_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config = config();
        let cidr = |s: &str| {
            let (a, p) = s.split_once('/').unwrap();
            AddressSpec::Cidr(a.parse().unwrap(), p.parse().unwrap())
        };
        assign(dir.path(), "a", cidr("10.99.0.10/24"), &config).unwrap();
        for (spec, needle) in [
            ("10.99.0.10/24", "taken by machine a"),
            ("10.98.0.10/24", "not inside"),
            ("10.99.0.1/24", "gateway"),
            ("10.99.0.10/16", "not inside"),
        ] {
            let err = assign(dir.path(), "b", cidr(spec), &config).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("network.address"), "{text}");
            assert!(text.contains(needle), "{spec}: {text}");
        }
    }
}
