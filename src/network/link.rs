//! Links, addresses and routes over rtnetlink. rtnetlink is async; the
//! supervisor is single-threaded and forks, so every call here builds a
//! current-thread tokio runtime (no worker threads), runs, and drops it.
//! These run only after the container child exists, never before a fork.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use super::{NetworkError, NetworkPlan, GUEST_IFNAME};

fn run<T>(
    machine: &str,
    fut: impl Future<Output = Result<T, NetworkError>>,
) -> Result<T, NetworkError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetworkError::Netlink {
            machine: machine.to_owned(),
            step: "starting the netlink runtime".into(),
            message: e.to_string(),
        })?;
    rt.block_on(fut)
}

fn nl_err(machine: &str, step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let machine = machine.to_owned();
    let step = step.into();
    move |err| NetworkError::Netlink {
        machine,
        step,
        message: describe(&err),
    }
}

fn describe(err: &rtnetlink::Error) -> String {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
        other => other.to_string(),
    }
}

fn errno_of(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// A netlink handle in the current network namespace. Must be called
/// inside the runtime.
fn connect(machine: &str) -> Result<Handle, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetworkError::Netlink {
            machine: machine.to_owned(),
            step: "opening a netlink socket".into(),
            message: e.to_string(),
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink handle whose socket lives in process `pid`'s network
/// namespace: the (single-threaded) caller enters it just long enough to
/// create the socket, then returns to its own.
fn connect_in_netns(machine: &str, pid: libc::pid_t) -> Result<Handle, NetworkError> {
    let io = |action: &'static str, path: String| {
        let machine = machine.to_owned();
        move |source: std::io::Error| NetworkError::Io {
            machine,
            action,
            path: path.into(),
            source,
        }
    };
    let own_path = "/proc/thread-self/ns/net".to_owned();
    let target_path = format!("/proc/{pid}/ns/net");
    let own = File::open(&own_path).map_err(io("open", own_path.clone()))?;
    let target = File::open(&target_path).map_err(io("open", target_path.clone()))?;
    setns(&target, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io("setns(CLONE_NEWNET) into", target_path)(e.into()))?;
    let handle = connect(machine);
    if let Err(errno) = setns(&own, CloneFlags::CLONE_NEWNET) {
        // Staying in the machine's namespace would wire the host's side
        // into the wrong place; nothing sane can go on.
        panic!("setns back into the supervisor's network namespace failed: {errno}");
    }
    handle
}

async fn index_of(handle: &Handle, machine: &str, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(err) if errno_of(&err) == Some(libc::ENODEV) => Ok(None),
        Err(err) => Err(nl_err(machine, format!("looking up link {name}"))(err)),
    }
}

async fn set_up(
    handle: &Handle,
    machine: &str,
    name: &str,
    index: u32,
) -> Result<(), NetworkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err(machine, format!("setting {name} up")))
}

async fn add_address(
    handle: &Handle,
    machine: &str,
    ifname: &str,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetworkError> {
    let mut request = handle.address().add(index, addr, prefix).replace();
    if addr.is_ipv6() {
        // No duplicate detection: the subnet is ours and the address is
        // unique in it; DAD would leave it tentative for a second or more.
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request.execute().await.map_err(nl_err(
        machine,
        format!("adding {addr}/{prefix} to {ifname}"),
    ))
}

async fn delete_named(handle: &Handle, machine: &str, name: &str) -> Result<bool, NetworkError> {
    let Some(index) = index_of(handle, machine, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(err) if errno_of(&err) == Some(libc::ENODEV) => Ok(false),
        Err(err) => Err(nl_err(machine, format!("deleting link {name}"))(err)),
    }
}

/// Wires a private machine whose init (host pid `pid`) has not run yet:
/// the bridge (when it is ours), the veth pair with `host0` created right
/// in the machine's namespace, and inside it `lo`, `host0`, the addresses
/// and the default routes.
pub fn setup_private(plan: &NetworkPlan, pid: libc::pid_t) -> Result<(), NetworkError> {
    let machine = plan.machine.as_str();
    run(machine, async {
        let host = connect(machine)?;
        let bridge = match index_of(&host, machine, &plan.bridge).await? {
            Some(index) => index,
            None if plan.managed_bridge => {
                match host
                    .link()
                    .add(
                        LinkBridge::new(&plan.bridge)
                            .address(bridge_mac(&plan.bridge).to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(err) if errno_of(&err) == Some(libc::EEXIST) => {}
                    Err(err) => {
                        return Err(nl_err(machine, format!("creating bridge {}", plan.bridge))(
                            err,
                        ))
                    }
                }
                index_of(&host, machine, &plan.bridge)
                    .await?
                    .ok_or_else(|| NetworkError::Netlink {
                        machine: machine.to_owned(),
                        step: format!("creating bridge {}", plan.bridge),
                        message: "the bridge vanished right after it was created".into(),
                    })?
            }
            None => {
                return Err(NetworkError::Invalid {
                    machine: machine.to_owned(),
                    key: "network.bridge",
                    reason: format!("no bridge named {:?} exists on this host", plan.bridge),
                })
            }
        };
        if plan.managed_bridge {
            refuse_configuration_from_machines(machine, &plan.bridge)?;
            if let Some(v4) = plan.bridge_ipv4 {
                add_address(
                    &host,
                    machine,
                    &plan.bridge,
                    bridge,
                    v4.addr.into(),
                    v4.prefix,
                )
                .await?;
            }
            if let Some(v6) = plan.bridge_ipv6 {
                add_address(
                    &host,
                    machine,
                    &plan.bridge,
                    bridge,
                    v6.addr.into(),
                    v6.prefix,
                )
                .await?;
            }
            set_up(&host, machine, &plan.bridge, bridge).await?;
        }

        // A veth of the same name is a leftover of a boot that crashed.
        delete_named(&host, machine, &plan.host_veth).await?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(GUEST_IFNAME.to_owned())
            .address(plan.guest_mac.to_vec())
            .setns_by_pid(pid as u32)
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(plan.host_veth.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .controller(bridge)
            // Marks the port as this instance's (see guard::port_group).
            .link_group(super::guard::port_group(&plan.table))
            .build();
        host.link().add(veth).execute().await.map_err(nl_err(
            machine,
            format!(
                "creating veth {} (peer {GUEST_IFNAME} in pid {pid}'s namespace) on {}",
                plan.host_veth, plan.bridge
            ),
        ))?;
        let veth_index = index_of(&host, machine, &plan.host_veth)
            .await?
            .ok_or_else(|| NetworkError::Netlink {
                machine: machine.to_owned(),
                step: format!("creating veth {}", plan.host_veth),
                message: "the link vanished right after it was created".into(),
            })?;
        set_up(&host, machine, &plan.host_veth, veth_index).await?;

        let guest = connect_in_netns(machine, pid)?;
        if let Some(lo) = index_of(&guest, machine, "lo").await? {
            set_up(&guest, machine, "lo", lo).await?;
        }
        let host0 = index_of(&guest, machine, GUEST_IFNAME)
            .await?
            .ok_or_else(|| NetworkError::Netlink {
                machine: machine.to_owned(),
                step: "configuring host0".into(),
                message: "host0 is not in the machine's namespace".into(),
            })?;
        if let Some(v4) = plan.ipv4 {
            add_address(
                &guest,
                machine,
                GUEST_IFNAME,
                host0,
                v4.addr.into(),
                v4.prefix,
            )
            .await?;
        }
        if let Some(v6) = plan.ipv6 {
            add_address(
                &guest,
                machine,
                GUEST_IFNAME,
                host0,
                v6.addr.into(),
                v6.prefix,
            )
            .await?;
        }
        set_up(&guest, machine, GUEST_IFNAME, host0).await?;
        if let Some(gw) = plan.gateway_v4 {
            let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .output_interface(host0)
                .gateway(gw)
                .onlink()
                .build();
            guest.route().add(route).execute().await.map_err(nl_err(
                machine,
                format!("adding the default route via {gw}"),
            ))?;
        }
        if let (Some(gw), Some(_)) = (plan.gateway_v6, plan.ipv6) {
            let route = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .output_interface(host0)
                .gateway(gw)
                .build();
            guest.route().add(route).execute().await.map_err(nl_err(
                machine,
                format!("adding the IPv6 default route via {gw}"),
            ))?;
        }
        Ok(())
    })
}

/// The host's side of the managed bridge takes no configuration from the
/// machines: no router advertisements (a default route, addresses, an MTU),
/// no autoconfigured addresses, no ICMP redirects. Set before the bridge
/// comes up and on every start (a few sysctl writes), so a bridge left by
/// an earlier daemon is covered too. IPv6 forwarding does not need
/// `accept_ra` on the bridge: the uplinks keep theirs (see firewall.rs).
fn refuse_configuration_from_machines(machine: &str, bridge: &str) -> Result<(), NetworkError> {
    let settings = [
        ("ipv6", "accept_ra"),
        ("ipv6", "autoconf"),
        ("ipv6", "accept_redirects"),
        ("ipv4", "accept_redirects"),
    ];
    for (family, key) in settings {
        let path = format!("/proc/sys/net/{family}/conf/{bridge}/{key}");
        match std::fs::write(&path, "0") {
            Ok(()) => {}
            // No IPv6 on this host (ipv6.disable=1): nothing to refuse.
            Err(e) if family == "ipv6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetworkError::Io {
                    machine: machine.to_owned(),
                    action: "write 0 to",
                    path: path.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// `mode = "none"`: only `lo`, up.
pub fn setup_loopback_only(machine: &str, pid: libc::pid_t) -> Result<(), NetworkError> {
    run(machine, async {
        let guest = connect_in_netns(machine, pid)?;
        if let Some(lo) = index_of(&guest, machine, "lo").await? {
            set_up(&guest, machine, "lo", lo).await?;
        }
        Ok(())
    })
}

/// A fixed, locally administered MAC address for the managed bridge.
/// Without one the bridge takes its lowest port's address, which changes
/// when that machine stops; IPv6 neighbours are not told (no unsolicited
/// neighbour advertisement by default), so machines would keep sending to
/// the old address until their neighbour entry expires.
pub fn bridge_mac(bridge: &str) -> [u8; 6] {
    let hash = super::address::fnv1a64(bridge.as_bytes()).to_be_bytes();
    // Locally administered (bit 1), unicast (bit 0 clear).
    [0x02, hash[0], hash[1], hash[2], hash[3], hash[4]]
}

/// Deletes a host link by name; false when there was none.
pub fn delete_link(machine: &str, name: &str) -> Result<bool, NetworkError> {
    run(machine, async {
        let host = connect(machine)?;
        delete_named(&host, machine, name).await
    })
}

/// Makes sure the host side of a stopped machine's veth pair is gone.
///
/// The kernel removes the pair by itself when the machine's network
/// namespace dies with its last process, in 1–2 ms here; deleting it over
/// netlink instead waits for an RCU grace period (about 10 ms here), which
/// every stop would pay. So this waits up to `grace` for the link to
/// vanish and deletes it only if it is still there: something outside the
/// machine (an `nsenter`ed process, a bind-mounted `/proc/PID/ns/net`)
/// keeps the namespace alive, or the boot failed before the namespace
/// existed. Returns whether it had to delete the link.
pub fn remove_machine_link(
    machine: &str,
    name: &str,
    grace: std::time::Duration,
) -> Result<bool, NetworkError> {
    // /proc/sys/net shows the caller's network namespace (sysfs shows the
    // one of whoever mounted it), and every link has an IPv4 entry there.
    let entry = std::path::Path::new("/proc/sys/net/ipv4/conf").join(name);
    let deadline = std::time::Instant::now() + grace;
    while entry.exists() {
        if std::time::Instant::now() >= deadline {
            return delete_link(machine, name);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(false)
}

/// Names of the host's links, each with the name of its master (the
/// bridge it is attached to), if any.
pub fn links_with_masters() -> Result<Vec<(String, Option<String>)>, NetworkError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    run("-", async {
        let host = connect("-")?;
        let mut links = Vec::new();
        let mut dump = host.link().get().execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(nl_err("-", "listing links"))?
        {
            let mut name = None;
            let mut master = None;
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Controller(index) => master = Some(index),
                    _ => {}
                }
            }
            if let Some(name) = name {
                links.push((msg.header.index, name, master));
            }
        }
        let name_of = |index: u32| {
            links
                .iter()
                .find(|(i, _, _)| *i == index)
                .map(|(_, n, _)| n.clone())
        };
        Ok(links
            .iter()
            .map(|(_, name, master)| (name.clone(), master.and_then(name_of)))
            .collect())
    })
}

/// Names of the host's links./// Names of the host's links.
pub fn link_names() -> Result<Vec<String>, NetworkError> {
    run("-", async {
        let host = connect("-")?;
        let mut names = Vec::new();
        let mut links = host.link().get().execute();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(nl_err("-", "listing links"))?
        {
            for attr in msg.attributes {
                if let rtnetlink::packet_route::link::LinkAttribute::IfName(name) = attr {
                    names.push(name);
                }
            }
        }
        Ok(names)
    })
}
