//! What a machine may send and reach: anti-spoofing on the bridge and the
//! forwarding policy (`network.reach`, `network.isolated`).
//!
//! Two parts of rmachines' own tables (docs/networking.md, "What a machine
//! cannot do on the network"):
//!
//! - `table bridge <name>`: every frame a machine sends enters the bridge
//!   through the host side of its veth. Chain `prerouting` sends it, by the
//!   verdict map `ports` (port name : `goto m-<port>`), to the machine's own
//!   chain, which drops whatever does not carry the machine's MAC, IPv4 and
//!   IPv6 addresses, router advertisements, redirects and DHCP server
//!   replies. A `ve-*` port that is not in the map (a machine not yet
//!   wired, or already withdrawn) carries nothing. Chain `forward` keeps
//!   isolated machines' frames from the other machines' ports.
//! - in `table inet <name>`: sets of the machines' addresses by policy, and
//!   chains `input` and `forward` that apply `reach` and `isolated` to
//!   routed traffic. Their source addresses can be trusted because the
//!   bridge checked them.
//!
//! Everything a machine adds is one chain and a few set elements, added and
//! deleted in the same transaction as its NAT element, so a start or stop
//! stays one small `nft` call whatever the number of machines.

use serde_json::{json, Value};

use super::NetworkPlan;
use crate::definition::Reach;

/// Base chains of the bridge table; `prio` -300 runs before anything else
/// a bridge family table may hold.
const PRIO_FIRST: i32 = -300;
/// Protocol numbers, not names: nft resolves `icmp` and `ipv6-icmp` through
/// /etc/protocols, which a minimal host (Debian without netbase) lacks, and
/// then rejects the whole ruleset (found by the VM stage, scripts/vm).
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// The interface group of this instance's machine ports (`ip link ... group
/// N`), from its table name: the bridge table's catch-all for ports not in
/// its map matches only these, so another rmachined's table (or one a
/// killed instance left) never drops our machines' frames. (`meta ibrname`
/// would say it directly, but kernels without bridge meta support refuse
/// it.) Never 0, the group every other interface has.
pub(crate) fn port_group(table: &str) -> u32 {
    // FNV-1a: stable across builds and architectures.
    let hash = table.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    (hash % 0x7fff_fff0) + 0x10
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn not_matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "!=", "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

/// Bits of the transport header (ICMPv6 here), for the ND fields nft has no
/// name for.
fn raw_th(offset: u32, len: u32) -> Value {
    json!({"payload": {"base": "th", "offset": offset, "len": len}})
}

fn set(items: Vec<Value>) -> Value {
    json!({"set": items})
}

fn drop_if(mut exprs: Vec<Value>) -> Vec<Value> {
    exprs.push(json!({"drop": null}));
    exprs
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mac_hex(mac: [u8; 6]) -> String {
    let mut out = String::from("0x");
    for b in mac {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn ipv6_hex(addr: std::net::Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(addr))
}

/// The machine's own chain in the bridge table.
pub(crate) fn machine_chain(plan: &NetworkPlan) -> String {
    format!("m-{}", plan.host_veth)
}

/// Rules that hold for every machine port alike, in the prerouting chain
/// before the ports map: each drops one kind of frame no machine may send.
/// They used to be in every machine's chain; there their anonymous sets
/// (five per machine) made each start's `nft` run list and create sets in
/// proportion to the machines running.
fn common_port_rules() -> Vec<Vec<Value>> {
    let unspecified = matches(payload("ip6", "saddr"), json!("::"));
    vec![
        // Only IPv4, IPv6 and ARP: no VLAN tags to hide in, no spanning
        // tree or LLDP frames for the bridge.
        drop_if(vec![not_matches(
            payload("ether", "type"),
            set(vec![json!("ip"), json!("ip6"), json!("arp")]),
        )]),
        // No DHCP (v4 or v6) server or relay replies, no redirects, no
        // router advertisements or renumbering.
        drop_if(vec![matches(
            payload("udp", "sport"),
            set(vec![json!(67), json!(547)]),
        )]),
        drop_if(vec![matches(payload("icmp", "type"), json!("redirect"))]),
        drop_if(vec![matches(
            payload("icmpv6", "type"),
            set(vec![
                json!("nd-router-advert"),
                json!("nd-redirect"),
                json!("router-renumbering"),
            ]),
        )]),
        // From :: only what duplicate address detection and joining its
        // groups needs.
        drop_if(vec![
            unspecified.clone(),
            not_matches(meta("l4proto"), json!(IPPROTO_ICMPV6)),
        ]),
        drop_if(vec![
            unspecified,
            not_matches(
                payload("icmpv6", "type"),
                set(vec![
                    json!("nd-neighbor-solicit"),
                    json!("nd-router-solicit"),
                    json!("mld-listener-report"),
                    json!("mld2-listener-report"),
                ]),
            ),
        ]),
    ]
}

/// `left` is none of `values`: one `!=` per value, in one rule (their
/// conjunction), so that a machine's chain holds no anonymous set.
fn none_of(left: &Value, values: impl IntoIterator<Item = Value>) -> Vec<Value> {
    values
        .into_iter()
        .map(|value| not_matches(left.clone(), value))
        .collect()
}

/// The rules of the machine's own chain: each drops a frame that claims an
/// address not its own. Order does not matter (all are drops; the chain's
/// end lets the rest through). With [`common_port_rules`] before them.
fn machine_rules(plan: &NetworkPlan) -> Vec<Vec<Value>> {
    let mac = mac_text(plan.guest_mac);
    let mut rules = Vec::new();
    if let Some(v4) = plan.ipv4 {
        let own = v4.addr.to_string();
        // ARP probes (RFC 5227) come from 0.0.0.0; nobody learns from them.
        rules.push(drop_if(none_of(
            &payload("arp", "saddr ip"),
            [json!("0.0.0.0"), json!(own)],
        )));
        rules.push(drop_if(vec![not_matches(
            payload("ip", "saddr"),
            json!(own),
        )]));
    }
    if !plan.knows_guest_mac() {
        // A machine started by a version that did not fix host0's MAC
        // address (re-adopted after an upgrade): its MAC, and so its
        // link-local address, is unknown until it restarts.
        return rules;
    }
    // Its own MAC address, in the frame and in ARP.
    rules.push(drop_if(vec![not_matches(
        payload("ether", "saddr"),
        json!(mac),
    )]));
    rules.push(drop_if(vec![not_matches(
        payload("arp", "saddr ether"),
        json!(mac),
    )]));
    // The link-layer address options of neighbour discovery: when an ND
    // message carries options, the first one is the link-layer address
    // (Linux uses the first of duplicates) and it is the machine's own.
    // Options start after 24 bytes of a solicitation or advertisement,
    // after 8 of a router solicitation. From :: (duplicate address
    // detection) a solicitation has no such option; Linux ignores one.
    let not_unspecified = not_matches(payload("ip6", "saddr"), json!("::"));
    for (kind, option_type, offset) in [
        ("nd-neighbor-solicit", 1u32, 192u32),
        ("nd-neighbor-advert", 2, 192),
        ("nd-router-solicit", 1, 64),
    ] {
        let is_kind = matches(payload("icmpv6", "type"), json!(kind));
        rules.push(drop_if(vec![
            is_kind.clone(),
            not_unspecified.clone(),
            json!({"match": {"op": ">", "left": payload("ip6", "length"), "right": offset / 8}}),
            not_matches(raw_th(offset, 8), json!(option_type)),
        ]));
        rules.push(drop_if(vec![
            is_kind,
            not_unspecified.clone(),
            matches(raw_th(offset, 8), json!(option_type)),
            not_matches(raw_th(offset + 16, 48), json!(mac_hex(plan.guest_mac))),
        ]));
    }
    if plan.knows_ipv6_sources() {
        let mut own = vec![plan.guest_link_local()];
        own.extend(plan.ipv6.map(|v6| v6.addr));
        let mut sources = vec![json!("::")];
        sources.extend(own.iter().map(|a| json!(a.to_string())));
        rules.push(drop_if(none_of(&payload("ip6", "saddr"), sources)));
        // A neighbour advertisement is about one of its own addresses.
        let mut advert = vec![matches(
            payload("icmpv6", "type"),
            json!("nd-neighbor-advert"),
        )];
        advert.extend(none_of(
            &raw_th(64, 128),
            own.iter().map(|a| json!(ipv6_hex(*a))),
        ));
        rules.push(drop_if(advert));
    }
    rules
}

/// Set elements of the inet table: (set name, element).
fn inet_elements(plan: &NetworkPlan) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let v4 = plan.ipv4.map(|c| json!(c.addr.to_string()));
    let v6 = plan.ipv6.map(|c| json!(c.addr.to_string()));
    let mut add = |name: &'static str, value: &Option<Value>| {
        if let Some(value) = value {
            out.push((name, value.clone()));
        }
    };
    add("machines4", &v4);
    add("machines6", &v6);
    if plan.is_isolated() {
        add("isolated4", &v4);
        add("isolated6", &v6);
    }
    if plan.reach != Reach::All {
        add("restricted4", &v4);
        add("restricted6", &v6);
        if plan.knows_ipv6_sources() && plan.knows_guest_mac() {
            add(
                "restricted6",
                &Some(json!(plan.guest_link_local().to_string())),
            );
        }
    }
    if plan.reach == Reach::Nothing {
        add("closed4", &v4);
        add("closed6", &v6);
    }
    out
}

/// The inet sets this module fills, with their types.
const INET_SETS: [(&str, &str); 8] = [
    ("machines4", "ipv4_addr"),
    ("machines6", "ipv6_addr"),
    ("isolated4", "ipv4_addr"),
    ("isolated6", "ipv6_addr"),
    ("restricted4", "ipv4_addr"),
    ("restricted6", "ipv6_addr"),
    ("closed4", "ipv4_addr"),
    ("closed6", "ipv6_addr"),
];

/// Commands that add (or delete) one machine's chain, map element and set
/// elements in both tables.
pub(crate) fn member_commands(table: &str, plan: &NetworkPlan, add: bool) -> Vec<Value> {
    let mut cmds = bridge_member_commands(table, plan, add);
    cmds.extend(inet_member_commands(table, plan, add));
    cmds
}

/// `{"add": {"element": ...}}` or `{"delete": ...}`.
fn element_command(add: bool, body: Value) -> Value {
    let mut inner = serde_json::Map::new();
    inner.insert("element".to_owned(), body);
    let mut outer = serde_json::Map::new();
    outer.insert(
        (if add { "add" } else { "delete" }).to_owned(),
        Value::Object(inner),
    );
    Value::Object(outer)
}

/// The machine's set elements in the inet table.
pub(crate) fn inet_member_commands(table: &str, plan: &NetworkPlan, add: bool) -> Vec<Value> {
    inet_elements(plan)
        .into_iter()
        .map(|(name, elem)| {
            element_command(
                add,
                json!({"family": "inet", "table": table, "name": name, "elem": [elem]}),
            )
        })
        .collect()
}

/// The machine's chain and elements in the bridge table.
pub(crate) fn bridge_member_commands(table: &str, plan: &NetworkPlan, add: bool) -> Vec<Value> {
    let chain = machine_chain(plan);
    let mut cmds = Vec::new();
    if add {
        cmds.push(json!({"add": {"chain": {"family": "bridge", "table": table, "name": chain}}}));
        cmds.push(json!({"flush": {"chain": {"family": "bridge", "table": table, "name": chain}}}));
        for expr in machine_rules(plan) {
            cmds.push(json!({"add": {"rule": {
                "family": "bridge", "table": table, "chain": chain, "expr": expr,
            }}}));
        }
        cmds.push(element_command(
            add,
            json!({"family": "bridge", "table": table, "name": "ports",
                   "elem": [[plan.host_veth, {"goto": {"target": chain}}]]}),
        ));
    } else {
        cmds.push(element_command(
            add,
            json!({"family": "bridge", "table": table, "name": "ports",
                   "elem": [plan.host_veth]}),
        ));
    }
    if plan.is_isolated() {
        cmds.push(element_command(
            add,
            json!({"family": "bridge", "table": table, "name": "isolated",
                   "elem": [plan.host_veth]}),
        ));
    }
    if !add {
        cmds.push(json!({"flush": {"chain": {"family": "bridge", "table": table, "name": chain}}}));
        cmds.push(
            json!({"delete": {"chain": {"family": "bridge", "table": table, "name": chain}}}),
        );
    }
    cmds
}

/// The whole bridge table, created anew (add, delete, add: atomic and
/// idempotent), with every member's chain.
pub(crate) fn bridge_table(table: &str, members: &[&NetworkPlan]) -> Vec<Value> {
    let mut cmds = vec![
        json!({"add": {"table": {"family": "bridge", "name": table}}}),
        json!({"delete": {"table": {"family": "bridge", "name": table}}}),
        json!({"add": {"table": {"family": "bridge", "name": table}}}),
    ];
    for hook in ["prerouting", "forward"] {
        cmds.push(json!({"add": {"chain": {
            "family": "bridge", "table": table, "name": hook,
            "type": "filter", "hook": hook, "prio": PRIO_FIRST, "policy": "accept",
        }}}));
    }
    cmds.push(json!({"add": {"map": {
        "family": "bridge", "table": table, "name": "ports", "type": "ifname", "map": "verdict",
    }}}));
    cmds.push(json!({"add": {"set": {
        "family": "bridge", "table": table, "name": "isolated", "type": "ifname",
    }}}));
    let rule = |chain: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "bridge", "table": table, "chain": chain, "expr": expr}}});
    let machine_port = json!(format!("{}*", super::VETH_PREFIX));
    let this_instance_port = [
        matches(meta("iifgroup"), json!(port_group(table))),
        matches(meta("iifname"), machine_port.clone()),
    ];
    for common in common_port_rules() {
        let mut expr = this_instance_port.to_vec();
        expr.extend(common);
        cmds.push(rule("prerouting", expr));
    }
    cmds.push(rule(
        "prerouting",
        vec![json!({"vmap": {"key": meta("iifname"), "data": "@ports"}})],
    ));
    // A machine port not (or no longer) in the map: not wired yet, or its
    // machine is stopping.
    cmds.push(rule(
        "prerouting",
        drop_if(vec![
            matches(meta("iifgroup"), json!(port_group(table))),
            matches(meta("iifname"), machine_port.clone()),
        ]),
    ));
    cmds.push(rule(
        "forward",
        drop_if(vec![
            matches(meta("iifname"), json!("@isolated")),
            matches(meta("oifname"), machine_port.clone()),
        ]),
    ));
    cmds.push(rule(
        "forward",
        drop_if(vec![
            matches(meta("oifname"), json!("@isolated")),
            matches(meta("iifname"), machine_port),
        ]),
    ));
    for plan in members {
        cmds.extend(bridge_member_commands(table, plan, true));
    }
    cmds
}

/// The sets and filter chains of the inet table (created by the caller in
/// the same transaction). Members' elements are added by
/// [`inet_member_commands`], which the caller runs after this.
pub(crate) fn inet_policy(table: &str) -> Vec<Value> {
    let mut cmds = Vec::new();
    for (name, kind) in INET_SETS {
        cmds.push(
            json!({"add": {"set": {"family": "inet", "table": table, "name": name, "type": kind}}}),
        );
    }
    for hook in ["input", "forward"] {
        cmds.push(json!({"add": {"chain": {
            "family": "inet", "table": table, "name": format!("filter-{hook}"),
            "type": "filter", "hook": hook, "prio": 0, "policy": "accept",
        }}}));
    }
    let rule = |hook: &str, expr: Vec<Value>| {
        json!({"add": {"rule": {"family": "inet", "table": table,
                                "chain": format!("filter-{hook}"), "expr": expr}}})
    };
    let established = || {
        vec![
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
                             "right": ["established", "related"]}}),
            json!({"accept": null}),
        ]
    };
    // To the host: a restricted machine gets answers and ICMP (ping, error
    // messages, neighbour discovery), nothing else.
    cmds.push(rule("input", established()));
    cmds.push(rule(
        "input",
        drop_if(vec![
            matches(payload("ip", "saddr"), json!("@restricted4")),
            not_matches(meta("l4proto"), json!(IPPROTO_ICMP)),
        ]),
    ));
    cmds.push(rule(
        "input",
        drop_if(vec![
            matches(payload("ip6", "saddr"), json!("@restricted6")),
            not_matches(meta("l4proto"), json!(IPPROTO_ICMPV6)),
        ]),
    ));
    // Through the host: answers pass; a closed machine opens nothing; a
    // published port (DNATed) is open to all; a closed machine is reached
    // through its published ports only; isolated machines and the others
    // do not meet.
    cmds.push(rule("forward", established()));
    for (family, suffix) in [("ip", "4"), ("ip6", "6")] {
        cmds.push(rule(
            "forward",
            drop_if(vec![matches(
                payload(family, "saddr"),
                json!(format!("@closed{suffix}")),
            )]),
        ));
    }
    cmds.push(rule(
        "forward",
        vec![
            json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
            json!({"accept": null}),
        ],
    ));
    for (family, suffix) in [("ip", "4"), ("ip6", "6")] {
        cmds.push(rule(
            "forward",
            drop_if(vec![matches(
                payload(family, "daddr"),
                json!(format!("@closed{suffix}")),
            )]),
        ));
        for (from, to) in [("isolated", "machines"), ("machines", "isolated")] {
            cmds.push(rule(
                "forward",
                drop_if(vec![
                    matches(payload(family, "saddr"), json!(format!("@{from}{suffix}"))),
                    matches(payload(family, "daddr"), json!(format!("@{to}{suffix}"))),
                ]),
            ));
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{guest_mac, Ipv4Cidr, NetworkPlan};

    fn plan(mac: [u8; 6]) -> NetworkPlan {
        NetworkPlan {
            machine: "web".into(),
            host_veth: "ve-web".into(),
            bridge: "rm-br0".into(),
            managed_bridge: true,
            bridge_ipv4: None,
            bridge_ipv6: None,
            ipv4: Some(Ipv4Cidr {
                addr: "10.213.0.5".parse().unwrap(),
                prefix: 16,
            }),
            ipv6: None,
            gateway_v4: None,
            gateway_v6: None,
            nat: true,
            ports: vec![],
            guest_mac: mac,
            reach: Reach::Outside,
            isolated: false,
            table: "rmachines".into(),
            runtime_dir: "/run/rmachines/network".into(),
        }
    }

    #[test]
    fn a_machine_chain_checks_what_is_known() {
        let known = serde_json::to_string(&machine_rules(&plan(guest_mac("web")))).unwrap();
        assert!(known.contains(&mac_text(guest_mac("web"))), "{known}");
        assert!(known.contains("10.213.0.5"), "{known}");
        assert!(known.contains("fe80::"), "{known}");
        // A plan from before fixed MACs: no MAC or link-local rule.
        let unknown = serde_json::to_string(&machine_rules(&plan([0; 6]))).unwrap();
        assert!(!unknown.contains("saddr ether"), "{unknown}");
        assert!(!unknown.contains("fe80::"), "{unknown}");
        assert!(unknown.contains("10.213.0.5"), "{unknown}");
        // Rules about a kind of frame, not an address, are the table's.
        let common = serde_json::to_string(&common_port_rules()).unwrap();
        assert!(common.contains("nd-router-advert"), "{common}");
        assert!(!known.contains("nd-router-advert"), "{known}");
    }

    #[test]
    fn a_machine_chain_holds_no_anonymous_set() {
        // Each would be created (and listed by every later nft run) once
        // per machine: the cost of a start grew with the machines running.
        for mac in [guest_mac("web"), [0; 6]] {
            let chain = serde_json::to_string(&machine_rules(&plan(mac))).unwrap();
            assert!(!chain.contains("\"set\""), "{chain}");
        }
        let table = serde_json::to_string(&bridge_table("t", &[&plan(guest_mac("web"))])).unwrap();
        assert!(
            table.contains("nd-router-advert"),
            "the common rules are in the table"
        );
    }

    #[test]
    fn member_commands_add_and_delete_the_same_things() {
        let p = plan(guest_mac("web"));
        let add = serde_json::to_string(&member_commands("t", &p, true)).unwrap();
        let delete = serde_json::to_string(&member_commands("t", &p, false)).unwrap();
        for needle in ["\"ports\"", "restricted4", "isolated4", "m-ve-web"] {
            assert!(add.contains(needle), "{needle}: {add}");
            assert!(delete.contains(needle), "{needle}: {delete}");
        }
        assert!(!add.contains("closed4"), "{add}");
    }

    #[test]
    fn hex_forms() {
        assert_eq!(mac_hex([0x0a, 1, 2, 3, 4, 0xff]), "0x0a01020304ff");
        assert_eq!(mac_text([0x0a, 1, 2, 3, 4, 0xff]), "0a:01:02:03:04:ff");
        assert_eq!(
            ipv6_hex("fd00::5".parse().unwrap()),
            "0xfd000000000000000000000000000005"
        );
    }
}
