//! The clients: long-lived connections that keep talking, and how each ended.

use super::*;

/// How one long-lived connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Still exchanging data when the test stopped it.
    Alive,
    /// Never connected.
    NoConnect(String),
    /// Broke: an error or an echo that did not come back in time.
    Broken(String),
    /// Stopped by its own time limit while the test still ran it: not a break, but the
    /// connection exchanged nothing from then on, which a check for stalls would misread.
    OutOfTime,
}

/// How often each long-lived connection sends a line: six round trips per 600-ms route
/// change, so a change that breaks a connection shows before the next. (At 30 ms, 150
/// connections kept both CPUs of an emulated VM busy, and an agent starting beside them
/// took more than 20 s.)
pub const ROUND_EVERY: Duration = Duration::from_millis(100);

/// The tests' bound on a load's connections: beyond the per-test time-out (nextest ends a
/// test at 300 s, .config/nextest.toml), so no load stops by itself while its test still
/// watches it (in a 6.12 VM a 120-s bound ran out before the route-changes test's last
/// check, and all its connections looked stalled), and the loops stay bounded.
pub const LOAD_LIMIT: Duration = Duration::from_secs(320);

/// Long-lived connections from many clients, each sending a line and reading its echo
/// every [`ROUND_EVERY`] until stopped (bounded: `limit`).
pub struct LongLived {
    stop: Arc<AtomicBool>,
    /// Per connection: close it (gracefully) now.
    closes: Vec<Arc<AtomicBool>>,
    threads: Vec<thread::JoinHandle<Ended>>,
    /// Round trips done, per connection.
    pub rounds: Vec<Arc<AtomicU64>>,
    /// Each connection's client port (0 until connected).
    ports: Vec<Arc<AtomicU32>>,
    pub clients: Vec<Ipv4Addr>,
    broken: Arc<Mutex<Vec<(usize, String)>>>,
    limit: Duration,
    /// Connections stopped by `limit` so far.
    out_of_time: Arc<AtomicU64>,
}

impl LongLived {
    /// Opens `per_client` connections from each of `clients` (addresses of the topology's
    /// client namespace), all at once, and waits until all are established (or failed).
    pub fn open(
        topology: &Topology,
        clients: &[Ipv4Addr],
        per_client: usize,
        limit: Duration,
    ) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut rounds = Vec::new();
        let mut closes = Vec::new();
        let mut ports = Vec::new();
        let mut connection_clients = Vec::new();
        let connected = Arc::new(AtomicU64::new(0));
        let out_of_time = Arc::new(AtomicU64::new(0));
        let service: SocketAddr = format!("{SERVICE}:{SERVICE_PORT}").parse().unwrap();
        for (index, client) in clients
            .iter()
            .flat_map(|c| std::iter::repeat_n(*c, per_client))
            .enumerate()
        {
            let ns = format!("/run/netns/{}", topology.clients);
            let (stop, broken, count, connected, out_of_time) = (
                stop.clone(),
                broken.clone(),
                Arc::new(AtomicU64::new(0)),
                connected.clone(),
                out_of_time.clone(),
            );
            let close = Arc::new(AtomicBool::new(false));
            closes.push(close.clone());
            let port = Arc::new(AtomicU32::new(0));
            ports.push(port.clone());
            rounds.push(count.clone());
            connection_clients.push(client);
            threads.push(thread::spawn(move || {
                let netns = File::open(&ns).unwrap();
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let ended = converse(
                    client,
                    service,
                    [&stop, &close],
                    &count,
                    &port,
                    &connected,
                    limit,
                );
                match &ended {
                    Ended::Broken(why) => broken.lock().unwrap().push((index, why.clone())),
                    Ended::OutOfTime => {
                        out_of_time.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                ended
            }));
        }
        let total = threads.len() as u64;
        wait_polling(Duration::from_secs(30), || {
            connected.load(Ordering::SeqCst) >= total
        });
        LongLived {
            stop,
            closes,
            threads,
            rounds,
            ports,
            clients: connection_clients,
            broken,
            limit,
            out_of_time,
        }
    }

    /// Closes connection `index` (its client's side, gracefully); the others go on.
    pub fn close(&self, index: usize) {
        self.closes[index].store(true, Ordering::SeqCst);
    }

    /// Each client's server hosts, by where its connections of this load are.
    pub fn hosts_of_clients(&self, topology: &Topology) -> BTreeMap<Ipv4Addr, BTreeSet<u16>> {
        let hosts = topology.connection_hosts();
        let mut by_client: BTreeMap<Ipv4Addr, BTreeSet<u16>> = BTreeMap::new();
        for (client, port) in self.clients.iter().zip(&self.ports) {
            let port = port.load(Ordering::SeqCst) as u16;
            if let Some(host) = hosts.get(&(*client, port)) {
                by_client.entry(*client).or_default().insert(*host);
            }
        }
        by_client
    }

    /// Connection `index`'s client port (0 until it connected).
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index].load(Ordering::SeqCst) as u16
    }

    /// The connections broken so far, by index.
    pub fn broken_indices(&self) -> BTreeSet<usize> {
        self.broken
            .lock()
            .unwrap()
            .iter()
            .map(|(i, _)| *i)
            .collect()
    }

    /// Connections broken so far.
    pub fn broken(&self) -> usize {
        self.broken.lock().unwrap().len()
    }

    /// Round trips of each connection so far. Fails the test if a connection has reached
    /// the load's time limit: from then on it makes no progress, and a stall check would
    /// blame the cluster for the test's own slowness.
    pub fn progress(&self) -> Vec<u64> {
        let out_of_time = self.out_of_time.load(Ordering::SeqCst);
        assert_eq!(
            out_of_time, 0,
            "{out_of_time} connections reached the load's time limit of {:?} while the test \
             still watched them: the test ran longer than its load is bounded for",
            self.limit
        );
        self.rounds
            .iter()
            .map(|r| r.load(Ordering::SeqCst))
            .collect()
    }

    pub fn finish(self) -> Vec<Ended> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

fn converse(
    client: Ipv4Addr,
    service: SocketAddr,
    stops: [&AtomicBool; 2],
    rounds: &AtomicU64,
    port: &AtomicU32,
    connected: &AtomicU64,
    limit: Duration,
) -> Ended {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(client.into(), 0).into())
        .unwrap();
    let result = socket.connect_timeout(&service.into(), Duration::from_secs(5));
    if let Err(e) = result {
        connected.fetch_add(1, Ordering::SeqCst);
        return Ended::NoConnect(e.to_string());
    }
    let local = socket.local_addr().unwrap().as_socket().unwrap();
    port.store(local.port() as u32, Ordering::SeqCst);
    connected.fetch_add(1, Ordering::SeqCst);
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let start = Instant::now();
    let mut round = 0u64;
    while !stops.iter().any(|s| s.load(Ordering::SeqCst)) && start.elapsed() < limit {
        let line = format!("{round:015}\n");
        if let Err(e) = stream.write_all(line.as_bytes()) {
            return Ended::Broken(format!("write: {e}"));
        }
        let mut echo = [0u8; 16];
        if let Err(e) = stream.read_exact(&mut echo) {
            return Ended::Broken(format!("read: {e}"));
        }
        if echo != line.as_bytes() {
            return Ended::Broken("a wrong echo".into());
        }
        round += 1;
        rounds.store(round, Ordering::SeqCst);
        thread::sleep(ROUND_EVERY);
    }
    if !stops.iter().any(|s| s.load(Ordering::SeqCst)) {
        return Ended::OutOfTime;
    }
    Ended::Alive
}
