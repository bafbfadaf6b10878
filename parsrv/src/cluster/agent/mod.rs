//! The host's cluster agent: keeps its dispatcher's table in step with its peers' (sends the
//! entries its dispatcher places, takes theirs), shares its load, notices peers that go
//! silent, expires its idle clients, and tells the routing daemon when the host takes new
//! clients and when it stops.
//!
//! One thread, one tokio LocalSet; the state ([`Agent`]) is shared between its tasks by
//! `Rc<RefCell>` and never held across an await. The decisions are pure cores of their own
//! ([`Membership`], [`table::merge`], [`IdleClients`]); here they meet the dispatcher, and
//! the tasks are adapters: [`peers`] (the connections to the peers), [`periodic`] (the
//! heartbeat, the load, expiry, the dispatcher's decisions) and [`local`] (the control
//! socket and the routing hooks).

mod local;
mod peers;
mod periodic;

pub use local::{control_path, control_path_in};

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use parsrv_common::cluster::{AgentCounters, Host};
use tokio::{net::TcpListener, sync::mpsc};

use super::{
    expiry::IdleClients,
    membership::{Change, Membership},
    protocol::{self, Message, WireEntry, ENTRIES_PER_MESSAGE},
    spec::ClusterSpec,
    table::{self, Merge},
    tls::PeerTls,
};
use crate::{
    dataplane::{cluster::Dispatcher, monotonic_ns},
    error::{Error, Result},
    status::cluster::{ClusterStatus, PeerStatus, TableStatus},
};
use local::{control_listener, run_hook, serve_control};
use peers::{accept, dial};
use periodic::{broadcast_decisions, expire, heartbeat, read_load};

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
        let draining = agent.borrow_mut().withdraw();
        run_hook(&draining, "draining").await;
        let _ = std::fs::remove_file(control_path(&agent.borrow().spec.name));
        Ok(())
    }

    /// Stops taking new clients: this host is draining in its dispatcher (and in its next
    /// heartbeat). Returns the routing hook that withdraws it, for the caller to run.
    fn withdraw(&mut self) -> Vec<String> {
        self.membership.drain();
        let _ = self.write_own_host();
        self.spec.draining.clone()
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
