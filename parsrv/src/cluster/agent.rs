//! The host's cluster agent: keeps its dispatcher's table in step with its peers' (sends the
//! entries its dispatcher places, takes theirs), shares its load, notices peers that go
//! silent, expires its idle clients, and tells the routing daemon when the host takes new
//! clients and when it stops.
//!
//! One thread, one tokio LocalSet; the state is shared between its tasks by `Rc<RefCell>`
//! and never held across an await.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use parsrv_common::cluster::{AgentCounters, Host};
use tokio::{
    io::{unix::AsyncFd, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};

use super::{
    expiry::IdleClients,
    membership::{Change, Membership},
    protocol::{self, Message, WireEntry, ENTRIES_PER_MESSAGE, MAX_LINE},
    spec::ClusterSpec,
    status::{ClusterStatus, PeerStatus, TableStatus},
    table::{self, Merge},
    tls::PeerTls,
};
use crate::{
    control::{self, Request, Response},
    dataplane::{
        cluster::{decision_from, Dispatcher},
        monotonic_ns,
    },
    error::{Error, Result},
};

/// How often the agent sends its load (the heartbeat) and looks at its peers.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// How often it reads its group's queues.
const LOAD_EVERY: Duration = Duration::from_millis(500);
/// How often it looks for expired clients.
const EXPIRY_EVERY: Duration = Duration::from_secs(2);
/// Pause before dialing a peer again.
const REDIAL: Duration = Duration::from_millis(200);
/// Time a peer has to say hello on a new connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport's side of a peer; what it said and when is in [`Membership`].
struct PeerView {
    address: SocketAddr,
    mac: Option<[u8; 6]>,
    /// This agent's connection to it, while up.
    outbox: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Cancels the reader of its last accepted connection: a peer has one connection to
    /// this agent, and a newer one (after its agent restarted) replaces it.
    inbound: Option<tokio_util::sync::CancellationToken>,
}

pub struct Agent {
    spec: ClusterSpec,
    /// Mutual TLS with the peers; None with `plaintext = true`.
    tls: Option<Rc<PeerTls>>,
    mac: [u8; 6],
    dispatcher: Dispatcher,
    membership: Membership,
    room: i32,
    peers: BTreeMap<u16, PeerView>,
    messages: AgentCounters,
    idle: IdleClients,
}

type Shared = Rc<RefCell<Agent>>;

impl Agent {
    pub fn new(
        spec: ClusterSpec,
        tls: Option<PeerTls>,
        mac: [u8; 6],
        dispatcher: Dispatcher,
    ) -> Agent {
        let peers = spec
            .peers
            .iter()
            .map(|p| {
                (
                    p.host,
                    PeerView {
                        address: p.address,
                        mac: None,
                        outbox: None,
                        inbound: None,
                    },
                )
            })
            .collect();
        let membership = Membership::new(
            spec.host,
            spec.peers.iter().map(|p| p.host),
            spec.peer_timeout(),
            spec.idle_timeout(),
            Instant::now(),
        );
        let idle = IdleClients::new(spec.idle_timeout());
        Agent {
            spec,
            tls: tls.map(Rc::new),
            mac,
            dispatcher,
            membership,
            room: 0,
            peers,
            messages: AgentCounters::default(),
            idle,
        }
    }

    /// Runs until the future `stop` completes; then the host withdraws (the draining
    /// command) and the caller decides what happens to the dispatcher.
    pub async fn run(
        self,
        ring: RingBuf<MapData>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let listener = TcpListener::bind(self.spec.address)
            .await
            .map_err(Error::io(format!(
                "listening for peers on {}",
                self.spec.address
            )))?;
        let control = control_listener(&self.spec.name)?;
        let metrics = match self.spec.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(Error::io(format!("listening for metrics on {addr}")))?,
            ),
            None => None,
        };
        let agent: Shared = Rc::new(RefCell::new(self));
        if let Some(listener) = metrics {
            let agent = agent.clone();
            tokio::task::spawn_local(crate::metrics::serve(listener, move || {
                agent.borrow().status()
            }));
        }
        agent.borrow_mut().write_own_host()?;
        let peer_ids: Vec<u16> = agent.borrow().peers.keys().copied().collect();
        for id in peer_ids {
            tokio::task::spawn_local(dial(agent.clone(), id));
        }
        tokio::task::spawn_local(accept(agent.clone(), listener));
        tokio::task::spawn_local(broadcast_decisions(agent.clone(), ring));
        tokio::task::spawn_local(heartbeat(agent.clone()));
        tokio::task::spawn_local(read_load(agent.clone()));
        tokio::task::spawn_local(expire(agent.clone()));
        tokio::task::spawn_local(serve_control(agent.clone(), control));
        stop.await;
        let draining = {
            let mut agent = agent.borrow_mut();
            agent.membership.drain();
            let _ = agent.write_own_host();
            agent.spec.draining.clone()
        };
        run_hook(&draining, "draining").await;
        let _ = std::fs::remove_file(control_path(&agent.borrow().spec.name));
        Ok(())
    }

    fn this_host(&self) -> u16 {
        self.spec.host
    }

    fn write_own_host(&mut self) -> Result<()> {
        let state = self.membership.own_host_state();
        self.dispatcher.set_host(
            self.this_host(),
            Host {
                mac: self.mac,
                state,
                room: self.room,
                _pad: 0,
            },
            false,
        )
    }

    fn write_peer(&mut self, id: u16) -> Result<()> {
        let Some(mac) = self.peers[&id].mac else {
            return Ok(());
        };
        self.dispatcher.set_host(
            id,
            Host {
                mac,
                state: self.membership.peer_host_state(id),
                room: self.membership.peers()[&id].room,
                _pad: 0,
            },
            true,
        )
    }

    fn send_all(&mut self, message: &Message) {
        let line = protocol::encode(message);
        for peer in self.peers.values_mut() {
            if let Some(outbox) = &peer.outbox {
                if outbox.send(line.clone()).is_err() {
                    peer.outbox = None;
                }
            }
        }
    }

    /// This host's whole table, in messages.
    fn table_messages(&self) -> Vec<Message> {
        let entries: Vec<WireEntry> = self
            .dispatcher
            .clients()
            .iter()
            .map(|(client, entry)| WireEntry::new(*client, entry))
            .collect();
        entries
            .chunks(ENTRIES_PER_MESSAGE)
            .map(|chunk| Message::Entries {
                entries: chunk.to_vec(),
            })
            .collect()
    }

    /// Takes in a message from peer `from`.
    fn receive(&mut self, from: u16, message: Message) {
        let now_ns = monotonic_ns();
        match message {
            Message::Hello { .. } => {}
            Message::Load { state, room } => {
                self.membership.load(from, state, room);
                if let Err(e) = self.write_peer(from) {
                    log::error!("recording host {from}'s load: {e}");
                }
            }
            Message::Entries { entries } => {
                for wire in entries {
                    let client = wire.client.octets();
                    let ours = self.dispatcher.client(client);
                    let merged =
                        table::merge(ours.as_ref(), wire.entry(now_ns), self.this_host(), |h| {
                            self.membership.not_gone(h)
                        });
                    match merged {
                        Merge::Write(entry) => {
                            if let Err(e) = self.dispatcher.set_client(client, entry) {
                                log::error!("writing {}'s entry: {e}", wire.client);
                            }
                            self.messages.taken += 1;
                        }
                        Merge::Lost => self.messages.lost += 1,
                        Merge::Keep => {}
                    }
                }
            }
            Message::Synced => self.membership.synced(from),
            Message::Forget { clients } => {
                for client in clients {
                    // Only the host that served it forgets a client; an entry placed since
                    // (another host's) stays.
                    if self
                        .dispatcher
                        .client(client.octets())
                        .is_some_and(|e| e.host == from)
                    {
                        self.dispatcher.forget_client(client.octets());
                    }
                }
            }
        }
    }

    /// A message (any) came from peer `from`.
    fn heard(&mut self, from: u16) {
        if let Some(change) = self.membership.heard(from, Instant::now()) {
            self.apply(change);
        }
    }

    /// Looks at the peers ([`Membership::tick`]).
    fn check_peers(&mut self) {
        for change in self.membership.tick(Instant::now()) {
            self.apply(change);
        }
    }

    /// Writes a change of membership to the dispatcher, the log and the hooks.
    fn apply(&mut self, change: Change) {
        match change {
            Change::Up(id) => {
                log::info!("host {id} is up");
                if let Err(e) = self.write_peer(id) {
                    log::error!("recording host {id}: {e}");
                }
            }
            Change::Gone(id) => {
                log::warn!(
                    "host {id} is gone (silent for more than {:?})",
                    self.spec.peer_timeout()
                );
                if let Err(e) = self.write_peer(id) {
                    log::error!("recording host {id} as gone: {e}");
                }
            }
            Change::Ready => {
                log::info!("host {} is ready", self.this_host());
                let _ = self.write_own_host();
                let ready = self.spec.ready.clone();
                tokio::task::spawn_local(async move { run_hook(&ready, "ready").await });
            }
        }
    }

    /// Forgets the clients of hosts gone for longer than the idle time-out
    /// ([`Membership::long_gone`]), and their MACs.
    fn forget_long_gone(&mut self) {
        let long_gone = self.membership.long_gone(Instant::now());
        if long_gone.is_empty() {
            return;
        }
        for id in &long_gone {
            if let Some(mac) = self.peers.get_mut(id).and_then(|p| p.mac.take()) {
                self.dispatcher.forget_peer_mac(mac);
            }
        }
        for (client, entry) in self.dispatcher.clients() {
            if long_gone.contains(&entry.host) {
                self.dispatcher.forget_client(client);
                self.messages.host_left += 1;
            }
        }
    }

    pub fn status(&self) -> ClusterStatus {
        let clients = self.dispatcher.clients();
        let served_by = |host: u16| clients.iter().filter(|(_, e)| e.host == host).count();
        ClusterStatus {
            name: self.spec.name.clone(),
            host: self.this_host(),
            agent_pid: std::process::id(),
            state: self.membership.state(),
            room: self.room,
            service: self.spec.service.into(),
            interface: self.spec.interface.clone(),
            peers: self
                .peers
                .iter()
                .map(|(id, p)| {
                    let seen = &self.membership.peers()[id];
                    PeerStatus {
                        host: *id,
                        address: p.address,
                        state: seen.present.then_some(seen.state),
                        room: seen.room,
                        heard_ms_ago: seen.last_heard.map(|t| t.elapsed().as_millis() as u64),
                        connected: p.outbox.is_some(),
                        clients: served_by(*id),
                    }
                })
                .collect(),
            table: TableStatus {
                clients: clients.len(),
                served_here: served_by(self.this_host()),
                locked_here: clients
                    .iter()
                    .filter(|(_, e)| e.locker == self.this_host())
                    .count(),
            },
            dispatcher: self.dispatcher.counters().unwrap_or_default(),
            messages: self.messages,
        }
    }
}

/// Keeps a connection to peer `id` up, and sends on it: hello, this host's table, then
/// whatever is broadcast.
async fn dial(agent: Shared, id: u16) {
    let (target, local, tls) = {
        let agent = agent.borrow();
        (
            agent.peers[&id].address,
            agent.spec.address,
            agent.tls.clone(),
        )
    };
    // The last TLS failure, said once (the agent redials every REDIAL).
    let mut failure = String::new();
    loop {
        match connect(target, local).await {
            Ok(stream) => {
                // With TLS, nothing is sent before the peer has shown host `id`'s
                // certificate: a process on a down peer's address gets no table.
                let mut stream: Box<dyn tokio::io::AsyncWrite + Unpin> = match &tls {
                    None => Box::new(stream),
                    Some(tls) => {
                        match tokio::time::timeout(HELLO_TIMEOUT, tls.connect(stream, id)).await {
                            Ok(Ok(stream)) => {
                                failure.clear();
                                Box::new(stream)
                            }
                            outcome => {
                                let why = match outcome {
                                    Ok(Err(e)) => format!("TLS handshake failed ({e})"),
                                    _ => "no TLS handshake in time".to_owned(),
                                };
                                if why != failure {
                                    log::warn!("host {id} at {target}: {why}");
                                    failure = why;
                                }
                                tokio::time::sleep(REDIAL).await;
                                continue;
                            }
                        }
                    }
                };
                let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                let first: Vec<Vec<u8>> = {
                    let mut agent = agent.borrow_mut();
                    let hello = Message::Hello {
                        cluster: agent.spec.name.clone(),
                        host: agent.this_host(),
                        mac: protocol::format_mac(agent.mac),
                    };
                    let load = Message::Load {
                        state: agent.membership.state(),
                        room: agent.room,
                    };
                    agent.peers.get_mut(&id).expect("configured").outbox = Some(tx);
                    std::iter::once(hello)
                        .chain(std::iter::once(load))
                        .chain(agent.table_messages())
                        .chain(std::iter::once(Message::Synced))
                        .map(|m| protocol::encode(&m))
                        .collect()
                };
                let mut failed = false;
                for line in first {
                    if stream.write_all(&line).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                // TLS holds what is written until a flush.
                failed = failed || stream.flush().await.is_err();
                while !failed {
                    let Some(line) = rx.recv().await else { break };
                    failed =
                        stream.write_all(&line).await.is_err() || stream.flush().await.is_err();
                }
                agent
                    .borrow_mut()
                    .peers
                    .get_mut(&id)
                    .expect("configured")
                    .outbox = None;
                log::debug!("connection to host {id} ended");
            }
            Err(e) => log::debug!("dialing host {id} at {target}: {e}"),
        }
        tokio::time::sleep(REDIAL).await;
    }
}

/// Connects from this host's agent address (its IP is what peers check).
async fn connect(target: SocketAddr, local: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(local.ip(), 0))?;
    let stream = tokio::time::timeout(Duration::from_secs(1), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Takes the connections peers open, each read in a task of its own.
async fn accept(agent: Shared, listener: TcpListener) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        tokio::task::spawn_local(read_peer(agent.clone(), stream, from));
    }
}

/// The MAC the kernel's neighbour table (ARP) has for `addr` on any interface of this
/// namespace, if it has a complete entry.
fn neighbour_mac(addr: std::net::IpAddr) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    neighbour_in(&table, addr)
}

/// [`neighbour_mac`] in the text of /proc/net/arp.
fn neighbour_in(table: &str, addr: std::net::IpAddr) -> Option<[u8; 6]> {
    const COMPLETE: u32 = 0x2; // ATF_COM
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ip, flags, mac) = (fields.first()?, fields.get(2)?, fields.get(3)?);
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        (ip.parse::<std::net::IpAddr>().ok()? == addr && flags & COMPLETE != 0)
            .then(|| protocol::parse_mac(mac))
            .flatten()
    })
}

/// A peer's messages, one per line, each at most [`MAX_LINE`] bytes: the bound holds
/// while reading, so a peer that sends a line without end costs the agent that much
/// memory, not what it sends.
fn peer_lines<R: tokio::io::AsyncRead>(
    stream: R,
) -> futures_util::stream::Fuse<tokio_util::codec::FramedRead<R, tokio_util::codec::LinesCodec>> {
    use futures_util::StreamExt;
    tokio_util::codec::FramedRead::new(
        stream,
        tokio_util::codec::LinesCodec::new_with_max_length(MAX_LINE),
    )
    .fuse()
}

/// Reads a peer's connection: only from a configured peer's address, with TLS only from
/// the host whose certificate it shows.
async fn read_peer(agent: Shared, stream: TcpStream, from: SocketAddr) {
    let (expected, tls) = {
        let agent = agent.borrow();
        (
            agent.spec.peer_at(from.ip()).map(|p| p.host),
            agent.tls.clone(),
        )
    };
    let Some(expected) = expected else {
        return refuse(&agent, from, "not a configured peer".into());
    };
    match tls {
        None => read_messages(agent, stream, from, expected).await,
        Some(tls) => {
            match tokio::time::timeout(HELLO_TIMEOUT, tls.accept(stream, expected)).await {
                Ok(Ok(stream)) => read_messages(agent, stream, from, expected).await,
                Ok(Err(why)) => refuse(&agent, from, why),
                Err(_) => refuse(&agent, from, "no TLS handshake in time".into()),
            }
        }
    }
}

fn refuse(agent: &Shared, from: SocketAddr, why: String) {
    log::warn!("refused a connection from {from}: {why}");
    agent.borrow_mut().messages.refused += 1;
}

/// A peer's messages, from its hello on: the hello must name this cluster and host
/// `expected`, with the MAC the neighbour table has for `from`.
async fn read_messages<R: tokio::io::AsyncRead + Unpin>(
    agent: Shared,
    stream: R,
    from: SocketAddr,
    expected: u16,
) {
    use futures_util::StreamExt;
    let cluster = agent.borrow().spec.name.clone();
    let refuse = |why: String| refuse(&agent, from, why);
    let mut lines = peer_lines(stream);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, lines.next()).await;
    let Ok(Some(Ok(hello))) = hello else {
        return refuse("no hello".into());
    };
    let mac = match protocol::decode(&hello) {
        Ok(Message::Hello {
            cluster: theirs,
            host,
            mac,
        }) if theirs == cluster && host == expected => protocol::parse_mac(&mac),
        Ok(Message::Hello { cluster, host, .. }) => {
            return refuse(format!(
            "hello from host {host} of cluster '{cluster}', expected host {expected} of this one"
        ))
        }
        _ => return refuse("the first message is not a hello".into()),
    };
    let Some(mac) = mac else {
        return refuse("a hello without a valid MAC".into());
    };
    // The dispatcher forwards to this MAC: it must be the one the kernel resolved for the
    // peer's address (a process on the peer's address could say any).
    if let Some(neighbour) = neighbour_mac(from.ip()) {
        if neighbour != mac {
            return refuse(format!(
                "a hello with MAC {}, but the neighbour table has {} for {}",
                protocol::format_mac(mac),
                protocol::format_mac(neighbour),
                from.ip()
            ));
        }
    }
    let replaced = tokio_util::sync::CancellationToken::new();
    {
        let mut agent = agent.borrow_mut();
        let peer = agent.peers.get_mut(&expected).expect("configured");
        let old = peer.mac.replace(mac);
        if let Some(earlier) = peer.inbound.replace(replaced.clone()) {
            earlier.cancel();
        }
        if let Some(old) = old.filter(|old| *old != mac) {
            agent.dispatcher.forget_peer_mac(old);
        }
        agent.heard(expected);
    }
    loop {
        let next = tokio::select! {
            _ = replaced.cancelled() => {
                log::info!("host {expected}'s connection from {from} replaced by a newer one");
                return;
            }
            next = lines.next() => next,
        };
        let line = match next {
            Some(Ok(line)) => line,
            Some(Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded)) => {
                return refuse(format!("a line longer than {MAX_LINE} bytes"))
            }
            Some(Err(_)) | None => return,
        };
        match protocol::decode(&line) {
            Ok(message) => {
                let mut agent = agent.borrow_mut();
                agent.heard(expected);
                agent.receive(expected, message);
            }
            Err(e) => return refuse(format!("an unreadable message from host {expected}: {e}")),
        }
    }
}

/// Sends on to every peer each entry the dispatcher places.
async fn broadcast_decisions(agent: Shared, ring: RingBuf<MapData>) {
    // SAFETY: the ring owns its fd, which stays open (and the same) until the AsyncFd drops
    // it.
    let mut ring =
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(ring) => ring,
            Err(e) => {
                log::error!("watching the dispatcher's ring: {}", e.into_parts().1);
                return;
            }
        };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        // The kernel wakes the reader when a record arrives with nothing unread before it:
        // empty the ring before waiting again.
        let mut entries = Vec::new();
        while let Some(item) = ready.get_inner_mut().next() {
            if let Some(decision) = decision_from(&item) {
                entries.push(WireEntry::new(decision.client, &decision.entry));
            }
        }
        ready.clear_ready();
        if entries.is_empty() {
            continue;
        }
        let mut agent = agent.borrow_mut();
        agent.messages.broadcast += entries.len() as u64;
        for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
            agent.send_all(&Message::Entries {
                entries: chunk.to_vec(),
            });
        }
    }
}

/// Sends this host's load every beat, and looks at its peers.
async fn heartbeat(agent: Shared) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        beat.tick().await;
        let mut agent = agent.borrow_mut();
        let load = Message::Load {
            state: agent.membership.state(),
            room: agent.room,
        };
        agent.send_all(&load);
        agent.check_peers();
    }
}

/// Reads the free places of the local group's queues (its sockets that take connections).
async fn read_load(agent: Shared) {
    let group = agent.borrow().spec.group.clone();
    let mut every = tokio::time::interval(LOAD_EVERY);
    loop {
        every.tick().await;
        let asked = group.clone();
        let room =
            tokio::task::spawn_blocking(move || match control::request(&asked, &Request::Room) {
                Ok(Response::Room(room)) => Some(room),
                _ => None,
            })
            .await
            .ok()
            .flatten();
        let mut agent = agent.borrow_mut();
        match room {
            Some(room) => agent.room = room,
            None => log::debug!(
                "group '{group}' did not answer: the room stays {}",
                agent.room
            ),
        }
        if let Err(e) = agent.write_own_host() {
            log::error!("recording this host's load: {e}");
        }
    }
}

/// Forgets this host's clients that have had no connection here for the idle time-out, and
/// tells the peers.
async fn expire(agent: Shared) {
    let mut every = tokio::time::interval(EXPIRY_EVERY);
    loop {
        every.tick().await;
        let service = agent.borrow().spec.service;
        let connected = tokio::task::spawn_blocking(move || crate::sock_diag::clients_of(service))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read);
        let mut agent = agent.borrow_mut();
        agent.forget_long_gone();
        // Not knowing who is connected is not "nobody": an unread round expires nothing.
        let connected = match connected {
            Ok(connected) => connected,
            Err(e) => {
                log::warn!("reading the connections to {service}: {e}; no client expires now");
                continue;
            }
        };
        let this = agent.this_host();
        let served_here: BTreeSet<Ipv4Addr> = agent
            .dispatcher
            .clients()
            .into_iter()
            .filter(|(_, e)| e.host == this)
            .map(|(c, _)| Ipv4Addr::from(c))
            .collect();
        let expired = agent.idle.expired(&served_here, &connected, Instant::now());
        if expired.is_empty() {
            continue;
        }
        for client in &expired {
            agent.dispatcher.forget_client(client.octets());
        }
        agent.messages.expired += expired.len() as u64;
        agent.send_all(&Message::Forget { clients: expired });
    }
}

/// Runs a routing hook (`ready` or `draining`), logging its outcome.
async fn run_hook(command: &[String], what: &str) {
    let Some((program, args)) = command.split_first() else {
        return;
    };
    match tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
    {
        Ok(out) if out.status.success() => log::info!("{what} command {command:?} done"),
        Ok(out) => log::error!(
            "{what} command {command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log::error!("{what} command {command:?} could not start: {e}"),
    }
}

/// Where `parsrv cluster status` finds the agent of cluster `name`.
pub fn control_path(name: &str) -> std::path::PathBuf {
    control::run_dir().join(format!("cluster-{name}.sock"))
}

fn control_listener(name: &str) -> Result<control::ControlSocket> {
    let path = control_path(name);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(Error::Rejected(format!(
            "an agent of cluster '{name}' already runs on this host ({}): stop it first",
            path.display()
        )));
    }
    control::ControlSocket::bind_at(path)
}

/// Answers `parsrv cluster status` and `parsrv cluster drain`, over the control protocol
/// every parsrv socket speaks.
async fn serve_control(agent: Shared, control: control::ControlSocket) {
    control
        .serve(move |request| {
            let agent = agent.clone();
            async move {
                match request {
                    Request::Status => Response::ClusterStatus(Box::new(agent.borrow().status())),
                    Request::Drain => {
                        let command = {
                            let mut agent = agent.borrow_mut();
                            agent.membership.drain();
                            let _ = agent.write_own_host();
                            agent.spec.draining.clone()
                        };
                        run_hook(&command, "draining").await;
                        Response::Done("draining".into())
                    }
                    other => Response::Failed(control::ControlError::WrongSocket {
                        request: other.verb(),
                        fix: "a cluster agent takes `status` and `drain`; a group's requests go \
                              to its spawner (`parsrv status`, `parsrv group ...`)"
                            .into(),
                    }),
                }
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_neighbour_table_is_read_as_the_kernel_writes_it() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     198.51.100.2     0x1         0x2         02:00:c6:33:64:02     *        eth0\n\
                     198.51.100.3     0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let at = |ip: &str| neighbour_in(table, ip.parse().unwrap());
        assert_eq!(at("198.51.100.2"), Some([2, 0, 0xc6, 0x33, 0x64, 2]));
        assert_eq!(at("198.51.100.3"), None, "incomplete");
        assert_eq!(at("198.51.100.4"), None);
    }

    /// A line without end is refused once it passes MAX_LINE, having buffered about that
    /// much, not what was sent.
    #[test]
    fn a_peer_line_is_bounded_before_it_is_buffered() {
        use futures_util::StreamExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut theirs, ours) = tokio::io::duplex(64 * 1024);
            let sender = tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0usize;
                // 48 MiB without a newline, as the attack did; stops when refused.
                while sent < 48 << 20 {
                    if theirs.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            });
            let mut lines = peer_lines(ours);
            match lines.next().await {
                Some(Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded)) => {}
                other => panic!("{other:?}"),
            }
            drop(lines);
            let sent = sender.await.unwrap();
            // The reader gave up after about MAX_LINE (plus the pipe's 64 KiB).
            assert!(
                sent <= MAX_LINE + (256 << 10),
                "read {sent} bytes before refusing"
            );
        });
    }
}
