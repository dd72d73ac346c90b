//! The loopback relay for published ports reached at the host's `::1`.
//!
//! IPv6 has no `route_localnet`: the kernel never routes a packet with a
//! loopback source or destination off the host, so DNAT cannot carry a
//! connection to `[::1]:port` into a machine. The machine's supervisor
//! instead listens on `[::1]:host_port` (loopback only, so nothing of this
//! sits on the forwarding path for traffic from other hosts) and copies each
//! connection (TCP) or datagram exchange (UDP) to the machine's address.
//!
//! Every supervisor publishing the same port binds it with `SO_REUSEPORT`
//! (all supervisors run as root, which the kernel requires of sockets
//! sharing a port), so the kernel spreads new connections over the running
//! machines, and a machine that stops closes its listener and leaves the
//! rotation at once. The relay runs on a thread of its own that the
//! supervisor starts after the container is cloned and stops (and joins)
//! before the machine's network is torn down, so the supervisor is single
//! threaded whenever it clones.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};

use super::{NetworkError, NetworkPlan};
use crate::definition::Protocol;

/// At most this many relayed TCP connections per machine; further ones wait
/// in the listen queue.
const MAX_CONNECTIONS: usize = 1024;
/// At most this many UDP peers per machine.
const MAX_UDP_PEERS: usize = 1024;
/// A UDP peer that sent nothing for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);
const BUF_SIZE: usize = 64 * 1024;

/// A running relay; dropping it closes every listener and connection.
pub struct LoopbackRelay {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl LoopbackRelay {
    /// Binds `[::1]:host_port` for each of the plan's published ports and
    /// starts relaying to the machine (its IPv6 address when it has one,
    /// else its IPv4 address). None when there is nothing to relay.
    ///
    /// A port that cannot be bound (another program holds `[::1]:port`
    /// without `SO_REUSEPORT`) is skipped with a warning: the port still
    /// works on every other host address.
    pub fn start(plan: &NetworkPlan) -> Result<Option<LoopbackRelay>, NetworkError> {
        let target_ip = match (plan.ipv6, plan.ipv4) {
            (Some(v6), _) => std::net::IpAddr::V6(v6.addr),
            (None, Some(v4)) => std::net::IpAddr::V4(v4.addr),
            (None, None) => return Ok(None),
        };
        let mut relay = Relay::default();
        for port in &plan.ports {
            let target = SocketAddr::new(target_ip, port.machine_port);
            let bound = match port.protocol {
                Protocol::Tcp => bind_loopback(SockType::Stream, port.host_port).map(|fd| {
                    relay.listeners.push((TcpListener::from(fd), target));
                }),
                Protocol::Udp => bind_loopback(SockType::Datagram, port.host_port).map(|fd| {
                    relay.udp.push(UdpPort {
                        socket: UdpSocket::from(fd),
                        target,
                        peers: BTreeMap::new(),
                    });
                }),
            };
            if let Err(err) = bound {
                tracing::warn!(
                    machine = %plan.machine,
                    %port,
                    %err,
                    "cannot relay the published port from [::1]; it still works on the host's other addresses"
                );
            }
        }
        if relay.listeners.is_empty() && relay.udp.is_empty() {
            return Ok(None);
        }
        let (stop_read, stop) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
            NetworkError::Netlink {
                machine: plan.machine.clone(),
                step: "creating the relay's stop pipe".into(),
                message: e.to_string(),
            }
        })?;
        let thread = std::thread::Builder::new()
            .name("loopback-relay".into())
            .spawn(move || relay.run(stop_read))
            .map_err(|e| NetworkError::Netlink {
                machine: plan.machine.clone(),
                step: "starting the loopback relay".into(),
                message: e.to_string(),
            })?;
        Ok(Some(LoopbackRelay {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.stop, b"x");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A non-blocking socket bound to `[::1]:port` with `SO_REUSEPORT`
/// (listening, for a stream socket).
fn bind_loopback(kind: SockType, port: u16) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Inet6,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0));
    socket::bind(fd.as_raw_fd(), &addr)?;
    if kind == SockType::Stream {
        socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
    }
    Ok(fd)
}

/// Starts a non-blocking connect to `target`.
fn connect_nonblocking(target: SocketAddr) -> io::Result<TcpStream> {
    let family = match target {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let started = match target {
        SocketAddr::V4(addr) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(addr)),
        SocketAddr::V6(addr) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(addr)),
    };
    match started {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(err) => Err(err.into()),
    }
}

#[derive(Default)]
struct Relay {
    listeners: Vec<(TcpListener, SocketAddr)>,
    connections: Vec<Connection>,
    udp: Vec<UdpPort>,
}

/// One direction of a relayed TCP connection.
#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    /// The reading side sent FIN.
    eof: bool,
    /// FIN was passed on to the writing side.
    shut: bool,
}

struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    connected: bool,
    to_upstream: Pipe,
    to_client: Pipe,
}

struct UdpPort {
    socket: UdpSocket,
    target: SocketAddr,
    /// One connected upstream socket per client address.
    peers: BTreeMap<SocketAddr, (UdpSocket, Instant)>,
}

/// What one poll entry stands for.
#[derive(Clone, Copy)]
enum Slot {
    Stop,
    Listener(usize),
    Client(usize),
    Upstream(usize),
    UdpPort(usize),
    UdpPeer(usize, SocketAddr),
}

impl Relay {
    fn run(mut self, stop: OwnedFd) {
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            let mut slots = vec![Slot::Stop];
            let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            let mut add = |fd, events, slot| add_poll(&mut fds, &mut slots, fd, events, slot);
            if self.connections.len() < MAX_CONNECTIONS {
                for (i, (listener, _)) in self.listeners.iter().enumerate() {
                    add(listener.as_fd(), PollFlags::POLLIN, Slot::Listener(i));
                }
            }
            for (i, conn) in self.connections.iter().enumerate() {
                add(conn.client.as_fd(), conn.client_events(), Slot::Client(i));
                add(
                    conn.upstream.as_fd(),
                    conn.upstream_events(),
                    Slot::Upstream(i),
                );
            }
            for (i, port) in self.udp.iter().enumerate() {
                add(port.socket.as_fd(), PollFlags::POLLIN, Slot::UdpPort(i));
                for (peer, (upstream, _)) in &port.peers {
                    add(upstream.as_fd(), PollFlags::POLLIN, Slot::UdpPeer(i, *peer));
                }
            }
            // UDP peers expire; a timeout wakes us to forget idle ones.
            let timeout = if self.udp.iter().any(|p| !p.peers.is_empty()) {
                PollTimeout::from(10_000u16)
            } else {
                PollTimeout::NONE
            };
            if let Err(err) = poll(&mut fds, timeout) {
                if err != nix::errno::Errno::EINTR {
                    tracing::error!(%err, "loopback relay: poll failed");
                    return;
                }
                continue;
            }
            let ready: Vec<(Slot, PollFlags)> = fds
                .iter()
                .zip(&slots)
                .filter_map(|(fd, slot)| {
                    fd.revents()
                        .filter(|r| !r.is_empty())
                        .map(|revents| (*slot, revents))
                })
                .collect();
            drop(fds);
            for (slot, revents) in ready {
                match slot {
                    Slot::Stop => return,
                    Slot::Listener(i) => self.accept(i),
                    Slot::Client(i) => self.connections[i].on_client(revents, &mut buf),
                    Slot::Upstream(i) => self.connections[i].on_upstream(revents, &mut buf),
                    Slot::UdpPort(i) => self.udp[i].relay_client_datagrams(&mut buf),
                    Slot::UdpPeer(i, peer) => self.udp[i].relay_machine_datagrams(peer, &mut buf),
                }
            }
            self.connections.retain(|c| !c.finished());
            for port in &mut self.udp {
                port.peers.retain(|_, (_, seen)| seen.elapsed() < UDP_IDLE);
            }
        }
    }

    fn accept(&mut self, i: usize) {
        let (listener, target) = &self.listeners[i];
        while self.connections.len() < MAX_CONNECTIONS {
            let client = match listener.accept() {
                Ok((client, _)) => client,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    tracing::debug!(%err, "loopback relay: accept");
                    return;
                }
            };
            let _ = client.set_nonblocking(true);
            match connect_nonblocking(*target) {
                Ok(upstream) => self.connections.push(Connection {
                    client,
                    upstream,
                    connected: false,
                    to_upstream: Pipe::default(),
                    to_client: Pipe::default(),
                }),
                // Dropping the client resets it, as a refused DNAT would.
                Err(err) => tracing::debug!(%err, %target, "loopback relay: connect"),
            }
        }
    }
}

fn add_poll<'fd>(
    fds: &mut Vec<PollFd<'fd>>,
    slots: &mut Vec<Slot>,
    fd: BorrowedFd<'fd>,
    events: PollFlags,
    slot: Slot,
) {
    if !events.is_empty() {
        fds.push(PollFd::new(fd, events));
        slots.push(slot);
    }
}

impl Connection {
    fn client_events(&self) -> PollFlags {
        let mut events = PollFlags::empty();
        if self.to_upstream.buf.is_empty() && !self.to_upstream.eof {
            events |= PollFlags::POLLIN;
        }
        if !self.to_client.buf.is_empty() {
            events |= PollFlags::POLLOUT;
        }
        events
    }

    fn upstream_events(&self) -> PollFlags {
        if !self.connected {
            return PollFlags::POLLOUT;
        }
        let mut events = PollFlags::empty();
        if self.to_client.buf.is_empty() && !self.to_client.eof {
            events |= PollFlags::POLLIN;
        }
        if !self.to_upstream.buf.is_empty() {
            events |= PollFlags::POLLOUT;
        }
        events
    }

    fn on_client(&mut self, revents: PollFlags, buf: &mut [u8]) {
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            fill(&mut self.client, &mut self.to_upstream, buf);
        }
        if self.connected {
            flush(&mut self.upstream, &mut self.to_upstream);
        }
        flush(&mut self.client, &mut self.to_client);
    }

    fn on_upstream(&mut self, revents: PollFlags, buf: &mut [u8]) {
        if !self.connected {
            match socket::getsockopt(&self.upstream, sockopt::SocketError) {
                Ok(0) => self.connected = true,
                _ => {
                    // Refused or unreachable: end both sides.
                    self.to_client.eof = true;
                    self.to_upstream.eof = true;
                    self.to_client.shut = true;
                    self.to_upstream.shut = true;
                    return;
                }
            }
        } else if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            fill(&mut self.upstream, &mut self.to_client, buf);
        }
        flush(&mut self.upstream, &mut self.to_upstream);
        flush(&mut self.client, &mut self.to_client);
    }

    fn finished(&self) -> bool {
        self.to_upstream.shut && self.to_client.shut
    }
}

/// Reads what `from` has into an empty pipe.
fn fill(from: &mut TcpStream, pipe: &mut Pipe, buf: &mut [u8]) {
    if !pipe.buf.is_empty() || pipe.eof {
        return;
    }
    match from.read(buf) {
        Ok(0) => pipe.eof = true,
        Ok(n) => pipe.buf.extend_from_slice(&buf[..n]),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => {
            pipe.eof = true;
            pipe.buf.clear();
        }
    }
}

/// Writes what the pipe holds to `to`, and passes on FIN once it is empty.
fn flush(to: &mut TcpStream, pipe: &mut Pipe) {
    while !pipe.buf.is_empty() {
        match to.write(&pipe.buf) {
            Ok(0) => break,
            Ok(n) => {
                pipe.buf.drain(..n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                // The peer is gone: drop what it will never read.
                pipe.buf.clear();
                pipe.eof = true;
            }
        }
    }
    if pipe.eof && !pipe.shut {
        let _ = to.shutdown(Shutdown::Write);
        pipe.shut = true;
    }
}

impl UdpPort {
    /// Datagrams from loopback clients go out through each client's own
    /// connected socket, so replies can be told apart.
    fn relay_client_datagrams(&mut self, buf: &mut [u8]) {
        loop {
            let (n, peer) = match self.socket.recv_from(buf) {
                Ok(got) => got,
                Err(_) => return,
            };
            if !self.peers.contains_key(&peer) {
                if self.peers.len() >= MAX_UDP_PEERS {
                    continue;
                }
                let bind: SocketAddr = match self.target {
                    SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                    SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let upstream = match UdpSocket::bind(bind)
                    .and_then(|s| s.connect(self.target).map(|()| s))
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                {
                    Ok(upstream) => upstream,
                    Err(err) => {
                        tracing::debug!(%err, "loopback relay: udp upstream");
                        continue;
                    }
                };
                self.peers.insert(peer, (upstream, Instant::now()));
            }
            if let Some((upstream, seen)) = self.peers.get_mut(&peer) {
                *seen = Instant::now();
                let _ = upstream.send(&buf[..n]);
            }
        }
    }

    fn relay_machine_datagrams(&mut self, peer: SocketAddr, buf: &mut [u8]) {
        let Some((upstream, seen)) = self.peers.get_mut(&peer) else {
            return;
        };
        while let Ok(n) = upstream.recv(buf) {
            *seen = Instant::now();
            let _ = self.socket.send_to(&buf[..n], peer);
        }
    }
}
