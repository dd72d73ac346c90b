//! Private networking: the host bridge, one veth pair per machine, addresses
//! and routes configured from outside before init runs, and the nftables
//! rules for NAT and published ports.
//!
//! Planning (this module and [`address`]) turns a definition plus the
//! daemon's [`NetworkConfig`] into a plain-data [`NetworkPlan`]; the
//! supervisor applies that plan with [`link`] (rtnetlink) and [`firewall`]
//! (one nftables table of our own). See docs/networking.md.

pub mod address;
pub mod firewall;
mod guard;
pub mod link;
pub mod relay;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::definition::{AddressSpec, Definition, NetworkMode, PortSpec, Reach};

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// The guest side of every machine's veth pair.
pub const GUEST_IFNAME: &str = "host0";
/// Host-side veth names start with this.
pub const VETH_PREFIX: &str = "ve-";

/// An IPv4 address with a prefix length, e.g. `10.213.0.5/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv6 address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Cidr {
    pub addr: Ipv6Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network())
    }

    /// Whether the two networks share any address.
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        let longer = if self.prefix <= other.prefix {
            other
        } else {
            self
        };
        shorter.contains(longer.network())
    }

    /// The `n`th address of the network (`n = 1`: the conventional gateway).
    pub fn nth(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()).wrapping_add(n))
    }

    /// How many addresses the network holds (saturating at u32::MAX).
    pub fn size(self) -> u32 {
        (!self.mask()).saturating_add(1)
    }
}

impl Ipv6Cidr {
    fn mask(self) -> u128 {
        if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix.min(128)))
        }
    }

    pub fn network(self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & self.mask() == u128::from(self.network())
    }

    pub fn overlaps(self, other: Ipv6Cidr) -> bool {
        let (shorter, longer) = if self.prefix <= other.prefix {
            (self, other)
        } else {
            (other, self)
        };
        shorter.contains(longer.network())
    }

    pub fn nth(self, n: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network()).wrapping_add(n))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn split_cidr(s: &str) -> Result<(&str, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR form ADDRESS/PREFIX"))?;
    let prefix = prefix
        .parse::<u8>()
        .map_err(|_| format!("{s:?} has an invalid prefix length"))?;
    Ok((addr, prefix))
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = split_cidr(s)?;
        let addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: an IPv4 prefix is at most 32"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl FromStr for Ipv6Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = split_cidr(s)?;
        let addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv6 address"))?;
        if prefix > 128 {
            return Err(format!("{s:?}: an IPv6 prefix is at most 128"));
        }
        Ok(Ipv6Cidr { addr, prefix })
    }
}

/// The daemon's network settings. The defaults keep clear of the usual home,
/// office and cloud ranges (192.168/16, 10.0/16, 172.16/12's common parts)
/// and are checked against the host's routes before a machine starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The bridge rmachined creates and owns.
    pub bridge: String,
    /// Machines' IPv4 subnet; the host holds the first address on the bridge.
    pub ipv4_subnet: Ipv4Cidr,
    /// Machines' IPv6 subnet (ULA); None: no IPv6 on the managed bridge.
    pub ipv6_subnet: Option<Ipv6Cidr>,
    /// Name of the nftables tables (families inet and bridge) that hold every rule.
    pub table: String,
    /// Runtime state shared by all supervisors of this daemon: the firewall
    /// membership registry and its lock.
    pub runtime_dir: PathBuf,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "rm-br0".into(),
            ipv4_subnet: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 213, 0, 0),
                prefix: 16,
            },
            ipv6_subnet: Some(Ipv6Cidr {
                addr: Ipv6Addr::new(0xfd6d, 0x6163, 0x6869, 0x6e65, 0, 0, 0, 0),
                prefix: 64,
            }),
            table: "rmachines".into(),
            runtime_dir: PathBuf::from("/run/rmachines/network"),
        }
    }
}

impl NetworkConfig {
    pub fn gateway_v4(&self) -> Ipv4Addr {
        self.ipv4_subnet.nth(1)
    }

    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.ipv6_subnet.map(|s| s.nth(1))
    }
}

/// Everything the supervisor needs to wire one machine; plain data, part of
/// the machine's plan.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    pub machine: String,
    /// Host side of the veth pair.
    pub host_veth: String,
    /// The bridge the host side joins.
    pub bridge: String,
    /// The bridge is rmachined's own: created when missing, holds the gateways.
    pub managed_bridge: bool,
    /// The gateway addresses the managed bridge holds (with the subnet's prefix).
    pub bridge_ipv4: Option<Ipv4Cidr>,
    pub bridge_ipv6: Option<Ipv6Cidr>,
    /// The machine's addresses on host0.
    pub ipv4: Option<Ipv4Cidr>,
    pub ipv6: Option<Ipv6Cidr>,
    /// Default routes inside the machine.
    pub gateway_v4: Option<Ipv4Addr>,
    pub gateway_v6: Option<Ipv6Addr>,
    pub nat: bool,
    pub ports: Vec<PortSpec>,
    /// host0's MAC address, fixed by rmachined: the only source address
    /// the bridge takes from the machine.
    #[serde(default)]
    pub guest_mac: [u8; 6],
    /// What the machine may reach (`network.reach`).
    #[serde(default)]
    pub reach: Reach,
    /// `network.isolated`: no traffic with the other machines.
    #[serde(default)]
    pub isolated: bool,
    /// The nftables tables (inet and bridge) and the shared registry directory.
    pub table: String,
    pub runtime_dir: PathBuf,
}

impl NetworkPlan {
    /// The machine's addresses as shown by `Addresses` ("10.213.0.5/16").
    pub fn addresses(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v4) = self.ipv4 {
            out.push(v4.to_string());
        }
        if let Some(v6) = self.ipv6 {
            out.push(v6.to_string());
        }
        out
    }

    /// Whether the machine is kept apart from the other machines: asked for
    /// with `isolated`, or implied by a reach other than `all`.
    pub fn is_isolated(&self) -> bool {
        self.isolated || self.reach != Reach::All
    }

    /// host0's link-local address: the kernel derives it from the MAC
    /// address (EUI-64) when host0 comes up.
    pub fn guest_link_local(&self) -> Ipv6Addr {
        link_local(self.guest_mac)
    }

    /// Whether host0's MAC address is the one rmachined gave it (plans
    /// written before that have none).
    pub fn knows_guest_mac(&self) -> bool {
        self.guest_mac != [0; 6]
    }

    /// Whether rmachined knows every IPv6 source address the machine may
    /// use (its link-local one and the one it was given): on its own
    /// bridge, or with an explicit IPv6 address. A machine on a foreign
    /// bridge with `address = "auto"` may configure itself by SLAAC.
    pub fn knows_ipv6_sources(&self) -> bool {
        self.managed_bridge || self.ipv6.is_some()
    }
}

/// The EUI-64 link-local address of a MAC address (RFC 4291, appendix A).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 0x02, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

/// A fixed MAC address for a machine's host0, derived from its name:
/// locally administered and unicast, first byte 0x0a (the managed bridge's
/// starts with 0x02, so the two never meet).
pub fn guest_mac(machine: &str) -> [u8; 6] {
    let hash = address::fnv1a64(format!("host0:{machine}").as_bytes()).to_be_bytes();
    [0x0a, hash[0], hash[1], hash[2], hash[3], hash[4]]
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A definition key is wrong; `key` names it (`network.address`, ...).
    #[error("machine {machine}: {key}: {reason}")]
    Invalid {
        machine: String,
        key: &'static str,
        reason: String,
    },
    /// The daemon's network configuration does not fit this host.
    #[error("network configuration: {0}")]
    Config(String),
    #[error("machine {machine}: cannot {action} {}: {source}", path.display())]
    Io {
        machine: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine {machine}: {step}: {message}")]
    Netlink {
        machine: String,
        step: String,
        message: String,
    },
    #[error("machine {machine}: nftables: {message}")]
    Firewall { machine: String, message: String },
}

/// `ve-<name>`, or when that is longer than IFNAMSIZ allows,
/// `ve-<first 6 of name>-<5 hex digits of a hash of the name>`.
pub fn host_veth_name(machine: &str) -> String {
    let plain = format!("{VETH_PREFIX}{machine}");
    if plain.len() <= IFNAME_MAX {
        return plain;
    }
    let hash = address::fnv1a64(machine.as_bytes());
    let head: String = machine.chars().take(6).collect();
    format!("{VETH_PREFIX}{head}-{:05x}", hash & 0xf_ffff)
}

/// Builds the network plan of a machine: None for `mode = "none"`. Checks
/// the definition's keys against the host and the other machines and
/// assigns (and records under `storage_dir`) its addresses.
pub fn plan_network(
    def: &Definition,
    config: &NetworkConfig,
    storage_dir: &Path,
) -> Result<Option<NetworkPlan>, NetworkError> {
    let net = &def.network;
    if net.mode == NetworkMode::None {
        return Ok(None);
    }
    let invalid = |key: &'static str, reason: String| NetworkError::Invalid {
        machine: def.name.clone(),
        key,
        reason,
    };
    firewall::check_ports(&def.name, &net.ports, &config.runtime_dir)?;
    let host_veth = host_veth_name(&def.name);
    if !net.bridge.is_empty() {
        if !Path::new("/sys/class/net")
            .join(&net.bridge)
            .join("bridge")
            .is_dir()
        {
            return Err(invalid(
                "network.bridge",
                format!(
                    "no bridge named {:?} exists on this host; create it first or leave \
                     bridge empty for rmachined's own bridge {:?}",
                    net.bridge, config.bridge
                ),
            ));
        }
        // A foreign bridge: its addressing is not ours. An explicit address
        // is put on host0; with "auto" the guest configures itself (DHCP, ...).
        let (ipv4, ipv6) = match net.address {
            AddressSpec::Auto => (None, None),
            AddressSpec::Cidr(IpAddr::V4(addr), prefix) => (Some(Ipv4Cidr { addr, prefix }), None),
            AddressSpec::Cidr(IpAddr::V6(addr), prefix) => (None, Some(Ipv6Cidr { addr, prefix })),
        };
        return Ok(Some(NetworkPlan {
            machine: def.name.clone(),
            host_veth,
            bridge: net.bridge.clone(),
            managed_bridge: false,
            bridge_ipv4: None,
            bridge_ipv6: None,
            ipv4,
            ipv6,
            gateway_v4: None,
            gateway_v6: None,
            nat: net.nat,
            ports: net.ports.clone(),
            guest_mac: guest_mac(&def.name),
            reach: net.reach,
            isolated: net.isolated,
            table: config.table.clone(),
            runtime_dir: config.runtime_dir.clone(),
        }));
    }
    address::check_host_routes(config)?;
    let assigned = address::assign(storage_dir, &def.name, net.address, config)?;
    Ok(Some(NetworkPlan {
        machine: def.name.clone(),
        host_veth,
        bridge: config.bridge.clone(),
        managed_bridge: true,
        bridge_ipv4: Some(Ipv4Cidr {
            addr: config.gateway_v4(),
            prefix: config.ipv4_subnet.prefix,
        }),
        bridge_ipv6: config.ipv6_subnet.map(|s| Ipv6Cidr {
            addr: s.nth(1),
            prefix: s.prefix,
        }),
        ipv4: Some(assigned.0),
        ipv6: assigned.1,
        gateway_v4: Some(config.gateway_v4()),
        gateway_v6: config.gateway_v6(),
        nat: net.nat,
        ports: net.ports.clone(),
        guest_mac: guest_mac(&def.name),
        reach: net.reach,
        isolated: net.isolated,
        table: config.table.clone(),
        runtime_dir: config.runtime_dir.clone(),
    }))
}

/// The guest's /etc/resolv.conf when it has none: the host's upstream
/// nameservers (systemd-resolved's list first), loopback ones left out
/// because the guest cannot reach the host's loopback.
pub fn resolv_conf() -> String {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for path in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    if let Ok(ip) = addr.parse::<IpAddr>() {
                        if !ip.is_loopback() && !servers.contains(&ip) {
                            servers.push(ip);
                        }
                    }
                }
                (Some("search"), Some(_)) if search.is_empty() => {
                    search = line.split_whitespace().skip(1).map(str::to_owned).collect();
                }
                _ => {}
            }
        }
        if !servers.is_empty() {
            break;
        }
    }
    let mut out =
        String::from("# Generated by rmachined from the host's resolver configuration.\n");
    if servers.is_empty() {
        out.push_str("# The host has only loopback nameservers, which machines cannot reach.\n");
    }
    for server in servers.iter().take(3) {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz() {
        assert_eq!(host_veth_name("web"), "ve-web");
        assert_eq!(host_veth_name("abcdefghijkl"), "ve-abcdefghijkl");
        let long = host_veth_name("a-very-long-machine-name");
        assert!(long.len() <= IFNAME_MAX, "{long}");
        assert!(long.starts_with("ve-a-very"), "{long}");
        assert_ne!(long, host_veth_name("a-very-long-machine-name2"));
        assert_eq!(long, host_veth_name("a-very-long-machine-name"));
    }

    #[test]
    fn cidr_math() {
        let net: Ipv4Cidr = "10.213.7.9/16".parse().unwrap();
        assert_eq!(net.network(), Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(net.broadcast(), Ipv4Addr::new(10, 213, 255, 255));
        assert_eq!(net.nth(1), Ipv4Addr::new(10, 213, 0, 1));
        assert!(net.contains(Ipv4Addr::new(10, 213, 200, 1)));
        assert!(!net.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert!(net.overlaps("10.0.0.0/8".parse().unwrap()));
        assert!(!net.overlaps("10.214.0.0/16".parse().unwrap()));
        assert!(net.overlaps("0.0.0.0/0".parse().unwrap()));
        assert_eq!(net.size(), 65536);
        let v6: Ipv6Cidr = "fd00::5/64".parse().unwrap();
        assert!(v6.contains("fd00::ffff".parse().unwrap()));
        assert_eq!(v6.nth(1), "fd00::1".parse::<Ipv6Addr>().unwrap());
        assert!("1.2.3.4".parse::<Ipv4Cidr>().is_err());
        assert!("1.2.3.4/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn guest_mac_and_link_local() {
        let mac = guest_mac("web");
        assert_eq!(mac[0], 0x0a);
        assert_eq!(mac, guest_mac("web"));
        assert_ne!(mac, guest_mac("web2"));
        assert_eq!(
            link_local([0x0a, 0x11, 0x22, 0x33, 0x44, 0x55]),
            "fe80::811:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
    }
}
