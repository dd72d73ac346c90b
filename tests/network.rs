//! Private networking for real (as root): links, addresses, routes and
//! nftables rules on the test bridge `rmt-br0`. Traffic goes only to
//! loopback, to the machines, and to a client namespace the test makes.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rmachines::definition::{AddressSpec, PortSpec, Protocol, Reach};
use rmachines::network::{self, link, NetworkError};
use rmachines::runtime::protocol::MachineState;
use support::*;

const BOOT: Duration = Duration::from_secs(30);

/// Held by the tests that publish ports: route_localnet on the shared test
/// bridge depends on whether any running machine publishes one.
static PUBLISHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn publishing() -> std::sync::MutexGuard<'static, ()> {
    PUBLISHING.lock().unwrap_or_else(|e| e.into_inner())
}

fn boot(def: rmachines::definition::Definition) -> TestMachine {
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    m
}

/// Serves `/index.html` holding the machine's hostname on port 80.
fn serve_hostname(m: &TestMachine) {
    m.sh("mkdir -p /run/www && hostname > /run/www/index.html && httpd -p 80 -h /run/www");
}

/// One HTTP GET; None when nothing answered. Bounded by its timeouts.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let body = response.split("\r\n\r\n").nth(1)?.trim().to_owned();
    Some(body)
}

/// GET with a few retries while the server starts.
fn http_get_retry(addr: SocketAddr) -> Option<String> {
    for _ in 0..15 {
        if let Some(body) = http_get(addr) {
            return Some(body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn v4(m: &TestMachine) -> IpAddr {
    IpAddr::V4(m.plan.network.as_ref().unwrap().ipv4.unwrap().addr)
}

fn v6(m: &TestMachine) -> IpAddr {
    IpAddr::V6(m.plan.network.as_ref().unwrap().ipv6.unwrap().addr)
}

fn links() -> Vec<String> {
    link::link_names().expect("list links")
}

/// Both of the test configuration's tables (inet and bridge), as text.
fn table_text() -> String {
    let table = test_network_config().table;
    let mut text = String::new();
    for family in ["inet", "bridge"] {
        let out = Command::new("nft")
            .args(["list", "table", family, &table])
            .output()
            .expect("nft");
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// Nothing of this machine's network is left on the host.
fn assert_network_gone(m: &TestMachine) {
    let net = m.plan.network.as_ref().unwrap();
    assert!(
        !links().contains(&net.host_veth),
        "{} left behind",
        net.host_veth
    );
    let table = table_text();
    assert!(
        !table.contains(&format!("\"{}\"", net.host_veth))
            && !table.contains(&format!("m-{}", net.host_veth)),
        "rules for {} left:\n{table}",
        net.host_veth
    );
    for addr in net.addresses() {
        let addr = addr.split('/').next().unwrap().to_owned();
        assert!(!table.contains(&addr), "rules for {addr} left:\n{table}");
    }
}

fn port(host: u16, machine: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        host_port: host,
        machine_port: machine,
    }
}

#[test]
fn host_and_machine_reach_each_other() {
    let root = fixture("busybox");
    let mut m = boot(private_definition("nw-basic", &root));
    let net = m.plan.network.clone().unwrap();
    let addrs = m.sh("ip -o addr show dev host0");
    assert!(
        addrs.contains(&net.ipv4.unwrap().to_string()),
        "host0 lacks {}: {addrs}",
        net.ipv4.unwrap()
    );
    assert!(
        addrs.contains(&net.ipv6.unwrap().addr.to_string()),
        "{addrs}"
    );
    let routes = m.sh("ip route");
    let gw = net.gateway_v4.unwrap();
    assert!(
        routes.contains(&format!("default via {gw} dev host0")),
        "{routes}"
    );
    assert!(m.sh("ip -6 route").contains("default via"));
    assert!(m.sh("ip -o link show lo").contains("UP"));
    m.sh(&format!("ping -c 1 -W 3 {gw}"));
    m.sh(&format!("ping6 -c 1 -W 3 {}", net.gateway_v6.unwrap()));
    // The guest got a resolv.conf (the fixture has none).
    assert!(m.sh("cat /etc/resolv.conf").contains("rmachined"));

    serve_hostname(&m);
    assert_eq!(
        http_get_retry(SocketAddr::new(v4(&m), 80)).as_deref(),
        Some("nw-basic")
    );
    assert_eq!(
        http_get_retry(SocketAddr::new(v6(&m), 80)).as_deref(),
        Some("nw-basic")
    );
    // Guest to host TCP: the host listens on the gateway address.
    let listener = std::net::TcpListener::bind((gw, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    // busybox nc waits for the peer to close: run it in the background.
    let sent = m.enter(
        "",
        &[
            "/bin/sh",
            "-c",
            &format!("(echo hello | timeout 10 nc {gw} {port} >/dev/null 2>&1 &)"),
        ],
    );
    let mut conn = None;
    for _ in 0..50 {
        if let Ok((stream, _)) = listener.accept() {
            conn = Some(stream);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut conn = conn.unwrap_or_else(|| panic!("the guest never connected: {sent:?}"));
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "hello");
    drop(conn);

    // Its chain and map entry are in the bridge table while it runs.
    let table = table_text();
    assert!(
        table.contains(&format!("\"{}\" : goto m-{}", net.host_veth, net.host_veth)),
        "{table}"
    );
    m.stop();
    let end = m.wait_end(BOOT);
    assert_eq!(end.state, MachineState::Stopped, "{end:?}");
    assert_network_gone(&m);
    assert_nothing_left(&m);
}

/// The handles of both tables: a rebuild creates them anew.
fn table_handles() -> String {
    let table = test_network_config().table;
    ["inet", "bridge"]
        .map(|family| {
            let text = host_cmd(&["nft", "-a", "list", "table", family, &table]);
            text.lines().next().unwrap_or("").to_owned()
        })
        .join(" / ")
}

#[test]
fn machines_reach_each_other_over_the_bridge() {
    let _publishing = publishing();
    let root = fixture("busybox");
    let a = boot(private_definition("nw-peer-a", &root));
    // A start or stop next to a running machine changes only its own chain
    // and elements: the tables are not rebuilt. (Another test's machine
    // ending meanwhile runs a cleanup, which rebuilds them: try again.)
    let mut rebuilt = Vec::new();
    for _ in 0..3 {
        let handles = table_handles();
        assert!(handles.contains("# handle"), "{handles}");
        let mut passing = boot(private_definition("nw-peer-c", &root));
        passing.stop();
        passing.wait_end(BOOT);
        let after = table_handles();
        // (Its drop runs the harness's cleanup, which rebuilds.)
        drop(passing);
        if after == handles {
            rebuilt.clear();
            break;
        }
        rebuilt.push(format!("{handles} -> {after}"));
    }
    assert!(rebuilt.is_empty(), "the tables were rebuilt: {rebuilt:?}");
    let b = boot(private_definition("nw-peer-b", &root));
    serve_hostname(&b);
    let mut body = String::new();
    for _ in 0..15 {
        let out = a.enter(
            "",
            &[
                "/bin/sh",
                "-c",
                &format!(
                    "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} 80 | tail -n 1",
                    v4(&b)
                ),
            ],
        );
        body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(body, "nw-peer-b");
    a.sh(&format!("ping -c 1 -W 3 {}", v4(&b)));
}

/// The network is wired while the child mounts its root, but init runs
/// only after it: the first thing init sees is host0 up with its address
/// and the default route.
#[test]
fn init_starts_with_its_network_in_place() {
    let root = fixture("busybox");
    let mut def = private_definition("nw-early", &root);
    def.boot = false;
    def.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "{ ip -4 -o addr show dev host0; ip -4 route; } >/run/at-start 2>&1; exec sleep 600".into(),
    ];
    let m = boot(def);
    let seen = m.sh("cat /run/at-start");
    let addr = v4(&m).to_string();
    assert!(seen.contains(&format!("inet {addr}/")), "{seen}");
    assert!(seen.contains("default via"), "{seen}");
}

#[test]
fn mode_none_has_only_loopback_up() {
    let root = fixture("busybox");
    let m = boot(definition("nw-none", &root));
    assert!(m.plan.network.is_none());
    let links = m.sh("ip -o link");
    let lines: Vec<&str> = links.lines().collect();
    assert_eq!(lines.len(), 1, "{links}");
    assert!(
        lines[0].contains("lo:") && lines[0].contains("UP"),
        "{links}"
    );
    assert!(m.sh("ip -o addr").contains("127.0.0.1"));
}

#[test]
fn address_is_stable_across_restarts() {
    let root = fixture("busybox");
    let first = {
        let mut m = boot(private_definition("nw-stable", &root));
        let net = m.plan.network.clone().unwrap();
        m.stop();
        m.wait_end(BOOT);
        net
    };
    let m = boot(private_definition("nw-stable", &root));
    let second = m.plan.network.clone().unwrap();
    assert_eq!(first.ipv4, second.ipv4);
    assert_eq!(first.ipv6, second.ipv6);
    assert!(m
        .sh("ip -o addr show dev host0")
        .contains(&second.ipv4.unwrap().to_string()));
}

/// The kernel removes a stopped machine's veth with its network namespace;
/// when something outside keeps that namespace alive, the supervisor
/// deletes the veth itself before it reports the machine stopped.
#[test]
fn veth_goes_even_when_the_namespace_outlives_the_machine() {
    let root = fixture("busybox");
    let mut m = boot(private_definition("nw-held", &root));
    let host_veth = m.plan.network.as_ref().unwrap().host_veth.clone();
    let held = std::fs::File::open(format!("/proc/{}/ns/net", m.leader())).expect("netns");
    m.stop();
    m.wait_end(BOOT);
    assert!(!links().contains(&host_veth), "{host_veth} left behind");
    // The namespace itself lives on while we hold it: only the pair went.
    drop(held);
}

/// A network namespace standing for another host, wired to the host over
/// a veth pair; removed on drop.
struct ClientNetns {
    name: &'static str,
    host_veth: &'static str,
    host_ip: IpAddr,
    host_ip6: IpAddr,
}

impl ClientNetns {
    /// `n` (0..64) keeps parallel tests' namespaces and subnets apart.
    fn create(name: &'static str, host_veth: &'static str, n: u8) -> ClientNetns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = Command::new("ip").args(["link", "del", host_veth]).status();
        let host_cidr = format!("10.220.0.{}/30", 4 * n + 1);
        let client_cidr = format!("10.220.0.{}/30", 4 * n + 2);
        let host_ip = format!("10.220.0.{}", 4 * n + 1);
        let host_cidr6 = format!("fd6d:7465:7375:{n:x}::1/64");
        let client_cidr6 = format!("fd6d:7465:7375:{n:x}::2/64");
        let host_ip6 = format!("fd6d:7465:7375:{n:x}::1");
        let client = ClientNetns {
            name,
            host_veth,
            host_ip: host_ip.parse().unwrap(),
            host_ip6: host_ip6.parse().unwrap(),
        };
        for args in [
            vec!["netns", "add", name],
            vec![
                "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
            vec!["addr", "add", &host_cidr, "dev", host_veth],
            vec!["link", "set", host_veth, "up"],
            vec!["-n", name, "addr", "add", &client_cidr, "dev", "eth0"],
            vec!["-n", name, "link", "set", "eth0", "up"],
            vec!["-n", name, "link", "set", "lo", "up"],
            vec!["-n", name, "route", "add", "default", "via", &host_ip],
            vec!["addr", "add", &host_cidr6, "dev", host_veth, "nodad"],
            vec![
                "-n",
                name,
                "addr",
                "add",
                &client_cidr6,
                "dev",
                "eth0",
                "nodad",
            ],
            vec![
                "-n", name, "-6", "route", "add", "default", "via", &host_ip6,
            ],
        ] {
            let status = Command::new("ip").args(&args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        client
    }

    /// Runs `f` on a thread inside the client namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", self.host_veth])
            .status();
    }
}

/// Hostnames answering on `addr` over `tries` new connections.
fn answers(addr: SocketAddr, tries: usize) -> BTreeSet<String> {
    (0..tries).filter_map(|_| http_get(addr)).collect()
}

/// Hostnames answering on `addr` over at most `tries` new connections,
/// stopping early once `expected` were all seen (the kernel spreads
/// `SO_REUSEPORT` listeners by a hash, not in turn).
fn answers_until(addr: SocketAddr, tries: usize, expected: &BTreeSet<String>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        if let Some(body) = http_get(addr) {
            seen.insert(body);
        }
        if &seen == expected {
            break;
        }
    }
    seen
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn published_port_is_shared_by_running_machines() {
    let _publishing = publishing();
    let root = fixture("busybox");
    let mut machines: Vec<TestMachine> = (1..=3)
        .map(|i| {
            let mut def = private_definition(&format!("nw-web-{i}"), &root);
            def.network.ports = vec![port(18080, 80)];
            boot(def)
        })
        .collect();
    for m in &machines {
        serve_hostname(m);
        assert!(http_get_retry(SocketAddr::new(v4(m), 80)).is_some());
    }
    let all: BTreeSet<String> = (1..=3).map(|i| format!("nw-web-{i}")).collect();

    let loopback: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    assert_eq!(answers(loopback, 9), all, "from 127.0.0.1");

    // [::1]: the supervisors' loopback relay, sharing the port by SO_REUSEPORT.
    let loopback6: SocketAddr = "[::1]:18080".parse().unwrap();
    assert_eq!(answers_until(loopback6, 60, &all), all, "from [::1]");

    let client = ClientNetns::create("rmt-client", "rmt-cli-h", 0);
    let from_other_host = SocketAddr::new(client.host_ip, 18080);
    let seen = client.run(move || answers(from_other_host, 9));
    assert_eq!(seen, all, "from another host");
    // IPv6 from another host: DNAT in the inet table, forwarded.
    let from_other_host6 = SocketAddr::new(client.host_ip6, 18080);
    let seen = client.run(move || answers(from_other_host6, 9));
    assert_eq!(seen, all, "from another host over IPv6");
    assert_eq!(sysctl("/proc/sys/net/ipv6/conf/all/forwarding"), "1");
    // While forwarding is on, no interface ignores router advertisements
    // (accept_ra 1 would; rmachined raised them to 2).
    for entry in std::fs::read_dir("/proc/sys/net/ipv6/conf").unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "all" {
            let value = sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"));
            assert_ne!(value, "1", "{name} has accept_ra 1 while forwarding");
        }
    }

    // A machine that stops leaves the rotation at once.
    let mut stopped = machines.remove(1);
    stopped.stop();
    stopped.wait_end(BOOT);
    let rest: BTreeSet<String> = ["nw-web-1", "nw-web-3"].map(String::from).into();
    assert_eq!(answers(loopback, 6), rest);
    let seen = client.run(move || answers(from_other_host, 6));
    assert_eq!(seen, rest);
    let seen = client.run(move || answers(from_other_host6, 6));
    assert_eq!(
        seen,
        rest,
        "over IPv6 after a stop; forwarding {}; table:\n{}",
        sysctl("/proc/sys/net/ipv6/conf/all/forwarding"),
        table_text()
    );
    // Its loopback relay closed with it: only the running ones answer.
    assert_eq!(
        answers_until(loopback6, 40, &rest),
        rest,
        "from [::1] after a stop"
    );
    assert_network_gone(&stopped);

    // Hairpin: a machine reaches another machine through the host's port.
    // (Its own connections DNATed back to itself are not asserted: with
    // br_netfilter they are bridged back out of the port they came in by;
    // see docs/networking.md.)
    let gw = machines[0]
        .plan
        .network
        .as_ref()
        .unwrap()
        .gateway_v4
        .unwrap();
    let mut hairpin = BTreeSet::new();
    let mut errors = String::new();
    for _ in 0..6 {
        let out = machines[0].enter(
            "",
            &[
                "/bin/sh",
                "-c",
                &format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {gw} 18080 | tail -n 1"),
            ],
        );
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if body.is_empty() {
            errors.push_str(&String::from_utf8_lossy(&out.stderr));
        } else {
            hairpin.insert(body);
        }
    }
    assert!(
        hairpin.contains("nw-web-3"),
        "a machine through the host's published port: {hairpin:?} {errors}"
    );

    // IPv6 from the host itself, to a host address (not ::1).
    let gw6 = machines[0]
        .plan
        .network
        .as_ref()
        .unwrap()
        .gateway_v6
        .unwrap();
    assert!(!answers(SocketAddr::new(IpAddr::V6(gw6), 18080), 2).is_empty());
}

#[test]
fn bad_network_input_is_rejected_naming_the_key() {
    let _publishing = publishing();
    let root = fixture("busybox");
    let config = test_network_config();
    let storage = Path::new(TEST_NET_STORAGE);
    let links_before = links();

    let mut outside = private_definition("nw-bad-outside", &root);
    outside.network.address = AddressSpec::Cidr("192.0.2.77".parse().unwrap(), 24);
    let err = network::plan_network(&outside, &config, storage).unwrap_err();
    assert!(
        matches!(
            err,
            NetworkError::Invalid {
                key: "network.address",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not inside"), "{err}");

    let mut owner = private_definition("nw-bad-owner", &root);
    owner.network.address = AddressSpec::Cidr("10.219.77.77".parse().unwrap(), 16);
    network::plan_network(&owner, &config, storage).unwrap();
    let mut thief = private_definition("nw-bad-thief", &root);
    thief.network.address = AddressSpec::Cidr("10.219.77.77".parse().unwrap(), 16);
    let err = network::plan_network(&thief, &config, storage).unwrap_err();
    assert!(err.to_string().contains("network.address"), "{err}");
    assert!(err.to_string().contains("nw-bad-owner"), "{err}");
    network::address::release(storage, "nw-bad-owner").unwrap();

    let mut bridge = private_definition("nw-bad-bridge", &root);
    bridge.network.bridge = "rmt-nosuchbr".into();
    let err = network::plan_network(&bridge, &config, storage).unwrap_err();
    assert!(err.to_string().contains("network.bridge"), "{err}");
    assert!(err.to_string().contains("rmt-nosuchbr"), "{err}");

    // A subnet overlapping a host route.
    let mut overlapping = config.clone();
    overlapping.ipv4_subnet = "127.0.0.0/8".parse().unwrap();
    // A route of the host's own (not the default route, not the test bridge).
    let host_route = std::fs::read_to_string("/proc/net/route").unwrap();
    let route = host_route.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let mask = u32::from_be(u32::from_str_radix(f[7], 16).ok()?);
        let dest = u32::from_be(u32::from_str_radix(f[1], 16).ok()?);
        (mask != 0 && f[0] != config.bridge)
            .then(|| format!("{}/{}", std::net::Ipv4Addr::from(dest), mask.leading_ones()))
    });
    if let Some(route) = route {
        overlapping.ipv4_subnet = route.parse().unwrap();
        let err = network::plan_network(
            &private_definition("nw-bad-route", &root),
            &overlapping,
            storage,
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps the host route"), "{err}");
    }

    // The same host port to another machine port than a running machine's.
    let mut first = private_definition("nw-bad-port-a", &root);
    first.network.ports = vec![port(18090, 80)];
    let _running = boot(first);
    let mut second = private_definition("nw-bad-port-b", &root);
    second.network.ports = vec![port(18090, 81)];
    let err = network::plan_network(&second, &config, storage).unwrap_err();
    assert!(err.to_string().contains("network.ports"), "{err}");
    assert!(err.to_string().contains("nw-bad-port-a"), "{err}");

    // Nothing was created for the rejected machines.
    for name in [
        "nw-bad-outside",
        "nw-bad-thief",
        "nw-bad-bridge",
        "nw-bad-route",
        "nw-bad-port-b",
    ] {
        let veth = network::host_veth_name(name);
        assert!(!links().contains(&veth), "{veth} exists");
    }
    assert!(links_before.iter().all(|l| !l.starts_with("ve-nw-bad")));
}

#[test]
fn nat_masquerades_traffic_leaving_the_host() {
    let root = fixture("busybox");
    let mut def = private_definition("nw-nat", &root);
    def.network.nat = true;
    let m = boot(def);
    let outside = ClientNetns::create("rmt-outside", "rmt-out-h", 1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", outside.name);
    let server = std::thread::spawn(move || {
        let ns = std::fs::File::open(path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = std::net::TcpListener::bind("10.220.0.6:9099").unwrap();
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..100 {
            if let Ok((_, peer)) = listener.accept() {
                return Some(peer.ip());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    });
    ready_rx.recv().unwrap();
    m.sh("(echo hi | timeout 10 nc 10.220.0.6 9099 >/dev/null 2>&1 &)");
    let peer = server.join().unwrap();
    // The outside host sees the host's address, not the machine's.
    assert_eq!(peer, Some(outside.host_ip));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
}

/// Cleanup removes only what belongs to this configuration: a `ve-*` link
/// on another bridge (another rmachined's) survives it.
#[test]
fn cleanup_leaves_links_on_other_bridges_alone() {
    require_root();
    struct Links(&'static [&'static str]);
    impl Drop for Links {
        fn drop(&mut self) {
            for name in self.0 {
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
    let _guard = Links(&["ve-foreign", "rmt-foreignbr", "ve-rmtstale"]);
    for args in [
        vec!["link", "add", "rmt-foreignbr", "type", "bridge"],
        vec![
            "link",
            "add",
            "ve-foreign",
            "type",
            "veth",
            "peer",
            "name",
            "rmt-foreign-p",
        ],
        vec!["link", "set", "ve-foreign", "master", "rmt-foreignbr"],
    ] {
        let status = Command::new("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    // A leftover on a bridge of our own configuration goes; a separate
    // configuration keeps the test off the shared test bridge.
    let mut config = test_network_config();
    config.bridge = "rmt-cleanbr".into();
    config.table = "rmachines_test_cleanup".into();
    let runtime = tempfile::tempdir().unwrap();
    config.runtime_dir = runtime.path().to_path_buf();
    let _guard2 = Links(&["rmt-cleanbr"]);
    for args in [
        vec!["link", "add", "rmt-cleanbr", "type", "bridge"],
        vec![
            "link",
            "add",
            "ve-rmtstale",
            "type",
            "veth",
            "peer",
            "name",
            "rmt-stale-p",
        ],
        vec!["link", "set", "ve-rmtstale", "master", "rmt-cleanbr"],
    ] {
        let status = Command::new("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    network::firewall::cleanup(&config).unwrap();
    let now = links();
    assert!(
        now.contains(&"ve-foreign".to_owned()),
        "ve-foreign was removed"
    );
    assert!(now.contains(&"rmt-foreignbr".to_owned()));
    assert!(
        !now.contains(&"ve-rmtstale".to_owned()),
        "the stale link stayed"
    );
    assert!(
        !now.contains(&"rmt-cleanbr".to_owned()),
        "the unused bridge stayed"
    );
}

// ---------------------------------------------------------------------------
// What a machine cannot do on the network (docs/networking.md): real frames
// sent from inside the machines, checked against the host's and the
// neighbours' view.
// ---------------------------------------------------------------------------

/// Runs `f` on a thread inside the network namespace of process `pid`.
fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// Sends one raw Ethernet frame out of host0 of the machine: what its root
/// (CAP_NET_RAW in its own namespaces) can do.
fn send_frame(m: &TestMachine, frame: Vec<u8>) {
    in_netns(m.leader(), move || {
        let index = nix::net::if_::if_nametoindex(GUEST_IF).expect("host0 index");
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address point to live memory of the given sizes.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    });
    // Let the kernel process it before anyone looks.
    std::thread::sleep(Duration::from_millis(300));
}

const GUEST_IF: &str = "host0";
const BROADCAST: [u8; 6] = [0xff; 6];
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

fn ethernet(dst: [u8; 6], src: [u8; 6], kind: u16, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + body.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// An ARP reply ("gratuitous": sender and target the same) claiming that
/// `ip` is at `mac`.
fn arp_claim(src_mac: [u8; 6], mac: [u8; 6], ip: std::net::Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 2];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&ip.octets());
    arp.extend_from_slice(&BROADCAST);
    arp.extend_from_slice(&ip.octets());
    ethernet(BROADCAST, src_mac, 0x0806, &arp)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP frame (UDP checksum 0: none, allowed over IPv4).
fn udp4(
    (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    (src, sport): (std::net::Ipv4Addr, u16),
    (dst, dport): (std::net::Ipv4Addr, u16),
    data: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + data.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&sport.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(data);
    ethernet(dst_mac, src_mac, 0x0800, &ip)
}

/// An IPv6/ICMPv6 frame with a correct checksum.
fn icmp6(
    (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    mut message: Vec<u8>,
) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&message);
    let sum = checksum(&pseudo);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(message.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 255]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&message);
    ethernet(dst_mac, src_mac, 0x86dd, &ip)
}

/// A router advertisement: default router for 30 min, an autonomous
/// prefix 2001:db8:1::/64 and an MTU of 1280.
fn router_advert(mac: [u8; 6]) -> Vec<u8> {
    let mut ra = vec![134, 0, 0, 0, 64, 0];
    ra.extend_from_slice(&1800u16.to_be_bytes());
    ra.extend_from_slice(&[0; 8]);
    ra.extend_from_slice(&[1, 1]);
    ra.extend_from_slice(&mac);
    ra.extend_from_slice(&[3, 4, 64, 0xc0]);
    ra.extend_from_slice(&86400u32.to_be_bytes());
    ra.extend_from_slice(&14400u32.to_be_bytes());
    ra.extend_from_slice(&[0; 4]);
    ra.extend_from_slice(
        &"2001:db8:1::"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    ra.extend_from_slice(&[5, 1, 0, 0]);
    ra.extend_from_slice(&1280u32.to_be_bytes());
    icmp6(
        (ALL_NODES_MAC, mac),
        network::link_local(mac),
        "ff02::1".parse().unwrap(),
        ra,
    )
}

/// An unsolicited, overriding neighbour advertisement: `target` is at `mac`.
fn neighbour_advert(
    src_mac: [u8; 6],
    src: std::net::Ipv6Addr,
    target: std::net::Ipv6Addr,
    mac: [u8; 6],
) -> Vec<u8> {
    let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    na.extend_from_slice(&target.octets());
    na.extend_from_slice(&[2, 1]);
    na.extend_from_slice(&mac);
    icmp6(
        (ALL_NODES_MAC, src_mac),
        src,
        "ff02::1".parse().unwrap(),
        na,
    )
}

/// A neighbour solicitation for `target` whose source link-layer option
/// says `src` is at `mac`.
fn neighbour_solicit(
    (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    src: std::net::Ipv6Addr,
    target: std::net::Ipv6Addr,
    mac: [u8; 6],
) -> Vec<u8> {
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&target.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&mac);
    icmp6((dst_mac, src_mac), src, target, ns)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn host_cmd(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host's IPv6 routes on the bridge, and its default routes (other
/// tests' veths and client namespaces come and go).
fn host_routes(bridge: &str) -> String {
    let mut routes = host_cmd(&["ip", "-6", "route", "show", "dev", bridge]);
    routes.push_str(&host_cmd(&["ip", "-6", "route", "show", "default"]));
    routes
}

/// The IPv6 addresses on a host link.
fn bridge_addresses(link: &str) -> BTreeSet<String> {
    host_cmd(&["ip", "-6", "-o", "addr", "show", "dev", link])
        .lines()
        .filter_map(|l| Some(l.split_whitespace().nth(3)?.to_owned()))
        .collect()
}

/// The line of `ip neigh` output for `addr` (empty when none).
fn neigh_line(table: &str, addr: IpAddr) -> String {
    let needle = format!("{addr} ");
    table
        .lines()
        .find(|l| l.starts_with(&needle))
        .unwrap_or("")
        .to_owned()
}

/// A UDP socket bound in the namespace of `pid` (None: the test's own).
fn udp_socket(pid: Option<u32>, addr: SocketAddr) -> std::net::UdpSocket {
    let bind = move || {
        let socket = std::net::UdpSocket::bind(addr).expect("bind udp");
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        socket
    };
    match pid {
        Some(pid) => in_netns(pid, bind),
        None => bind(),
    }
}

/// The datagrams that arrive on `socket` until it has been quiet a while.
fn received(socket: &std::net::UdpSocket) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn forged_frames_change_no_one_view_of_the_network() {
    let root = fixture("busybox");
    let config = test_network_config();
    let bridge = config.bridge.clone();
    let attacker = boot(private_definition("nw-forge-a", &root));
    let victim = boot(private_definition("nw-forge-b", &root));
    let a = attacker.plan.network.clone().unwrap();
    let b = victim.plan.network.clone().unwrap();
    let (a_mac, b_mac) = (a.guest_mac, b.guest_mac);
    let br_mac = link::bridge_mac(&bridge);
    let (a4, b4) = (a.ipv4.unwrap().addr, b.ipv4.unwrap().addr);
    let (a6, b6) = (a.ipv6.unwrap().addr, b.ipv6.unwrap().addr);
    let gw4 = a.gateway_v4.unwrap();
    let gw6 = a.gateway_v6.unwrap();

    // The host side of the bridge takes no configuration from machines.
    for key in ["accept_ra", "autoconf", "accept_redirects"] {
        assert_eq!(
            sysctl(&format!("/proc/sys/net/ipv6/conf/{bridge}/{key}")),
            "0",
            "{key}"
        );
    }
    assert_eq!(
        sysctl(&format!(
            "/proc/sys/net/ipv4/conf/{bridge}/accept_redirects"
        )),
        "0"
    );
    // host0 has the MAC address rmachined gave it.
    assert!(
        attacker
            .sh("ip link show dev host0")
            .contains(&mac_text(a_mac)),
        "host0 MAC"
    );

    // Everyone knows everyone: the host learns the machines from their
    // neighbour requests, the machines learn the gateway.
    for m in [&attacker, &victim] {
        m.sh(&format!("ping -c 1 -W 3 {gw4} && ping6 -c 1 -W 3 {gw6}"));
    }
    let host_routes_before = host_routes(&bridge);
    let host_addrs_before = bridge_addresses(&bridge);
    let mtu_before = sysctl(&format!("/proc/sys/net/ipv6/conf/{bridge}/mtu"));
    // Linux takes a new link-layer address for an entry only after it has
    // been unchanged for locktime (1 s).
    std::thread::sleep(Duration::from_millis(1500));

    // ARP: the attacker claims the victim's address (to the host) and the
    // gateway's (to the victim), from its own MAC address.
    send_frame(&attacker, arp_claim(a_mac, a_mac, b4));
    send_frame(&attacker, arp_claim(a_mac, a_mac, gw4));
    // ... and with the victim's MAC address as its source.
    send_frame(&attacker, arp_claim(b_mac, a_mac, gw4));
    // IPv6 neighbour discovery: an advertisement for the gateway's and the
    // victim's address; a solicitation that says its own address is at
    // the bridge's MAC address.
    send_frame(
        &attacker,
        neighbour_advert(a_mac, network::link_local(a_mac), gw6, a_mac),
    );
    send_frame(
        &attacker,
        neighbour_advert(a_mac, network::link_local(a_mac), b6, a_mac),
    );
    send_frame(&attacker, neighbour_advert(a_mac, a6, a6, br_mac));
    send_frame(
        &attacker,
        neighbour_solicit((br_mac, a_mac), a6, gw6, br_mac),
    );
    // A router advertisement to all nodes.
    send_frame(&attacker, router_advert(a_mac));

    let host_neigh = host_cmd(&["ip", "neigh", "show", "dev", &bridge]);
    for (ip, mac) in [
        (IpAddr::V4(b4), b_mac),
        (IpAddr::V6(b6), b_mac),
        (IpAddr::V6(a6), a_mac),
    ] {
        let line = neigh_line(&host_neigh, ip);
        assert!(
            line.contains(&mac_text(mac)),
            "the host's entry for {ip} changed: {line:?}\n{host_neigh}"
        );
    }
    let victim_neigh = victim.sh("ip neigh show");
    for ip in [IpAddr::V4(gw4), IpAddr::V6(gw6)] {
        let line = neigh_line(&victim_neigh, ip);
        assert!(
            line.contains(&mac_text(br_mac)),
            "the victim's entry for {ip} changed: {line:?}\n{victim_neigh}"
        );
    }
    // The bridge did not learn the victim's MAC address on the attacker's port.
    let fdb = host_cmd(&["bridge", "fdb", "show", "dev", &a.host_veth]);
    assert!(!fdb.contains(&mac_text(b_mac)), "{fdb}");
    // No route, address or MTU from the advertisement, on the host or the
    // victim.
    assert_eq!(host_routes(&bridge), host_routes_before);
    assert_eq!(bridge_addresses(&bridge), host_addrs_before);
    assert_eq!(
        sysctl(&format!("/proc/sys/net/ipv6/conf/{bridge}/mtu")),
        mtu_before
    );
    let victim_routes = victim.sh("ip -6 route show; ip -6 addr show");
    assert!(!victim_routes.contains("2001:db8"), "{victim_routes}");
    assert!(
        !victim_routes.contains(&format!("via {}", network::link_local(a_mac))),
        "{victim_routes}"
    );
    assert_eq!(
        victim.sh("cat /proc/sys/net/ipv6/conf/host0/mtu").trim(),
        "1500"
    );

    // Spoofed IPv4 sources: only its own address reaches the host.
    let host_socket = udp_socket(None, SocketAddr::new(IpAddr::V4(gw4), 19999));
    for (src, tag) in [
        (b4, "neighbour"),
        ("192.0.2.66".parse().unwrap(), "foreign"),
        (a4, "own"),
    ] {
        send_frame(
            &attacker,
            udp4((br_mac, a_mac), (src, 40000), (gw4, 19999), tag.as_bytes()),
        );
    }
    assert_eq!(received(&host_socket), vec!["own".to_owned()]);

    // DHCP server replies: a machine may not send any, to anyone.
    let victim_socket = udp_socket(
        Some(victim.leader()),
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 68),
    );
    for sport in [67u16, 1067] {
        send_frame(
            &attacker,
            udp4(
                (b_mac, a_mac),
                (a4, sport),
                (b4, 68),
                format!("from {sport}").as_bytes(),
            ),
        );
    }
    assert_eq!(received(&victim_socket), vec!["from 1067".to_owned()]);

    // A machine that changes its MAC address is cut off until it puts it back.
    attacker.sh("ip link set dev host0 address 0a:de:ad:be:ef:01");
    let out = attacker.enter("", &["/bin/sh", "-c", &format!("ping -c 1 -W 2 {gw4}")]);
    assert!(!out.status.success(), "a changed MAC address still works");
    attacker.sh(&format!(
        "ip link set dev host0 address {} && ip neigh flush dev host0",
        mac_text(a_mac)
    ));
    attacker.sh(&format!("ping -c 1 -W 3 {gw4}"));
}

/// A TCP listener that accepts (and drops) connections until the test
/// ends, in the namespace of `netns` (a `/run/netns` name) or the test's.
fn tcp_sink(netns: Option<&str>, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = netns.map(|n| format!("/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(path) = path {
            let ns = std::fs::File::open(path).expect("netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let listener = std::net::TcpListener::bind(addr).expect("bind sink");
        ready_tx.send(()).unwrap();
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    ready_rx.recv().expect("sink ready");
}

/// Whether a TCP connection from inside the machine to `addr` succeeds.
fn connects(m: &TestMachine, addr: SocketAddr) -> bool {
    m.enter(
        "",
        &[
            "/bin/sh",
            "-c",
            &format!("nc -w 2 {} {} </dev/null", addr.ip(), addr.port()),
        ],
    )
    .status
    .success()
}

#[test]
fn reach_and_isolation_policies_hold() {
    let _publishing = publishing();
    let root = fixture("busybox");
    let machine = |name: &str, reach: Reach, isolated: bool| {
        let mut def = private_definition(name, &root);
        def.network.reach = reach;
        def.network.isolated = isolated;
        def
    };
    let all = boot(machine("nw-reach-all", Reach::All, false));
    let outside = boot(machine("nw-reach-out", Reach::Outside, false));
    let isolated = boot(machine("nw-reach-iso", Reach::All, true));
    let mut closed_def = machine("nw-reach-none", Reach::Nothing, false);
    closed_def.network.ports = vec![port(18110, 80)];
    let closed = boot(closed_def);
    for m in [&all, &outside, &isolated, &closed] {
        serve_hostname(m);
    }
    let gw = all.plan.network.as_ref().unwrap().gateway_v4.unwrap();
    let host_service = SocketAddr::new(IpAddr::V4(gw), 19100);
    tcp_sink(None, host_service);
    let world = ClientNetns::create("rmt-world", "rmt-world-h", 2);
    let world_service: SocketAddr = "10.220.0.10:19101".parse().unwrap();
    tcp_sink(Some(world.name), world_service);
    let web = |m: &TestMachine| SocketAddr::new(v4(m), 80);
    assert!(http_get_retry(web(&all)).is_some());
    assert!(http_get_retry(web(&closed)).is_some());

    // reach = "all": the host, the world, the other machines.
    assert!(connects(&all, host_service), "all -> host");
    assert!(connects(&all, world_service), "all -> world");
    assert!(!connects(&all, web(&outside)), "all -> outside");
    assert!(!connects(&all, web(&isolated)), "all -> isolated");
    assert!(!connects(&all, web(&closed)), "all -> closed");
    // isolated: the host and the world, no machine.
    assert!(connects(&isolated, host_service), "isolated -> host");
    assert!(connects(&isolated, world_service), "isolated -> world");
    assert!(!connects(&isolated, web(&all)), "isolated -> all");
    // reach = "outside": the world only; ICMP to the gateway still works.
    assert!(connects(&outside, world_service), "outside -> world");
    assert!(!connects(&outside, host_service), "outside -> host");
    assert!(!connects(&outside, web(&all)), "outside -> all");
    outside.sh(&format!("ping -c 1 -W 3 {gw}"));
    // reach = "nothing": nothing out; its published port in.
    assert!(!connects(&closed, world_service), "closed -> world");
    assert!(!connects(&closed, host_service), "closed -> host");
    assert!(!connects(&closed, web(&all)), "closed -> all");
    let published = SocketAddr::new(world.host_ip, 18110);
    let seen = world.run(move || http_get_retry(published));
    assert_eq!(
        seen.as_deref(),
        Some("nw-reach-none"),
        "world -> closed's port"
    );
    assert_eq!(
        http_get_retry("127.0.0.1:18110".parse().unwrap()).as_deref(),
        Some("nw-reach-none"),
        "host loopback -> closed's port"
    );
}

/// route_localnet is on only while a machine on the bridge publishes
/// ports, and a daemon start puts it back off after a crash.
#[test]
fn route_localnet_only_while_ports_are_published() {
    let _publishing = publishing();
    let root = fixture("busybox");
    let bridge = test_network_config().bridge;
    let path = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    let mut def = private_definition("nw-localnet", &root);
    def.network.ports = vec![port(18120, 80)];
    let mut published = boot(def);
    assert_eq!(sysctl(&path), "1");
    published.stop();
    published.wait_end(BOOT);
    // The bridge stays for the next machine; its route_localnet goes off.
    // (Or another test's cleanup removed the unused bridge meanwhile.)
    assert_ne!(sysctl(&path), "1", "after the last machine with ports left");
    let _keeper = boot(private_definition("nw-localnet-keep", &root));
    assert_eq!(sysctl(&path), "0");
    // A crashed daemon may leave it on: the next daemon start turns it off.
    std::fs::write(&path, "1").unwrap();
    network::firewall::cleanup(&test_network_config()).unwrap();
    assert_eq!(sysctl(&path), "0", "after the cleanup at daemon start");
}
