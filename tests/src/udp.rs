//! UDP reuseport groups built by hand, for the tests and benchmarks of the udp-datagram
//! program (`parsrv::dataplane::udp`): sockets with chosen receive buffers, the kernel's
//! per-socket accounting (SO_MEMINFO), and datagrams from many flows.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

use parsrv::dataplane::udp::{DatagramSteering, UdpSettings};
use parsrv_common::udp::UdpSlotCounters;
use socket2::{Domain, Socket, Type};

/// SO_RCVBUF asked of a small socket (the kernel doubles it: 8,192 bytes, room for 9
/// datagrams of 32 bytes on loopback, whose truesize is 832 bytes each on 6.18).
pub const SMALL_BUFFER: usize = 4096;
/// SO_RCVBUFFORCE of a large one: tens of thousands of small datagrams fit in it unread.
pub const LARGE_BUFFER: usize = 32 << 20;
/// The kernel's default buffer (net.core.rmem_default), as `parsrv run` leaves it.
pub const DEFAULT_BUFFER: usize = 0;

/// A reuseport group of UDP sockets on 127.0.0.1 (non-blocking), socket `i` with receive
/// buffer `buffers[i]` (the default for [`DEFAULT_BUFFER`], SO_RCVBUF up to
/// [`SMALL_BUFFER`], SO_RCVBUFFORCE above), and its address.
pub fn udp_group(buffers: &[usize]) -> (Vec<Socket>, SocketAddr) {
    let mut sockets = Vec::new();
    let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for &size in buffers {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        if size > SMALL_BUFFER {
            force_receive_buffer(socket.as_fd(), size);
        } else if size != DEFAULT_BUFFER {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.set_nonblocking(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        addr = socket.local_addr().unwrap().as_socket().unwrap();
        sockets.push(socket);
    }
    (sockets, addr)
}

/// The udp-datagram program on `sockets` (slot i = socket i), attached to their group.
pub fn steer_udp(sockets: &[Socket]) -> DatagramSteering {
    steer_udp_with(sockets, UdpSettings::datagram())
}

/// The UDP program of `settings.mode` on `sockets` (slot i = socket i), attached to their
/// group.
pub fn steer_udp_with(sockets: &[Socket], settings: UdpSettings) -> DatagramSteering {
    let mut steering = DatagramSteering::load(settings, None).expect("the UDP program loads");
    for (slot, socket) in sockets.iter().enumerate() {
        steering.register(slot as u32, socket).unwrap();
    }
    steering.attach(&sockets[0]).unwrap();
    steering
}

fn force_receive_buffer(fd: BorrowedFd<'_>, size: usize) {
    let value = size as libc::c_int;
    // SAFETY: an int option of an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &value as *const _ as *const libc::c_void,
            std::mem::size_of_val(&value) as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// What the kernel accounts for one socket (SO_MEMINFO), as parsrv's status reads it.
pub fn meminfo(fd: BorrowedFd<'_>) -> parsrv::kernel::ReceiveBuffer {
    parsrv::kernel::receive_buffer(fd).expect("SO_MEMINFO")
}

/// Sends `per_flow` datagrams of 32 bytes to `addr` from each of `flows` client sockets
/// (each its own 4-tuple, so its own hash), round by round, reading nothing. One pass:
/// bounded by its count.
pub fn send_datagrams(addr: SocketAddr, flows: usize, per_flow: usize) {
    send_rounds(addr, flows, per_flow, None);
}

/// As [`send_datagrams`]; the client sockets' addresses, in flow order.
pub fn send_flows(addr: SocketAddr, flows: usize, per_flow: usize) -> Vec<SocketAddr> {
    send_rounds(addr, flows, per_flow, None)
        .iter()
        .map(|client| client.local_addr().unwrap())
        .collect()
}

/// As [`send_datagrams`], with each datagram's bytes `payload(flow, round)`: QUIC packets,
/// for the quic program. One pass: bounded by its count.
pub fn send_payloads(
    addr: SocketAddr,
    flows: usize,
    per_flow: usize,
    payload: impl Fn(usize, usize) -> Vec<u8>,
) {
    let clients = clients(flows);
    for round in 0..per_flow {
        send_round(&clients, addr, |flow| payload(flow, round));
    }
}

/// `flows` client sockets on 127.0.0.1, each its own 4-tuple.
pub fn clients(flows: usize) -> Vec<UdpSocket> {
    (0..flows)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect()
}

/// One datagram, `payload(i)`, from each of `count` new sources, as a host on the network
/// floods a server with new flows: each from its own address (127.1.X.Y: every 4-tuple
/// differs, whatever ports the kernel picks), its socket closed once it sent. Bounded by
/// `count` (at most 64,000).
pub fn send_from_new_sources(addr: SocketAddr, count: usize, payload: impl Fn(usize) -> Vec<u8>) {
    assert!(
        count <= 250 * 256,
        "127.1.0.0/16 has room for 64,000 sources"
    );
    for i in 0..count {
        let source = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let socket = UdpSocket::bind((source, 0)).unwrap();
        socket.send_to(&payload(i), addr).unwrap();
    }
}

/// One datagram from each client, `payload(flow)`.
pub fn send_round(clients: &[UdpSocket], addr: SocketAddr, payload: impl Fn(usize) -> Vec<u8>) {
    for (flow, client) in clients.iter().enumerate() {
        client.send_to(&payload(flow), addr).unwrap();
    }
}

/// The 32-byte datagram flow `flow` sends in round `round`.
fn numbered(flow: usize, round: usize) -> Vec<u8> {
    format!("{flow:08}:{round:08}:0123456789abcd").into_bytes()
}

/// `flows` client sockets, each sending one 32-byte datagram to `addr` per round for
/// `per_flow` rounds, a round every `pace` if given; the clients, to read answers with.
fn send_rounds(
    addr: SocketAddr,
    flows: usize,
    per_flow: usize,
    pace: Option<Duration>,
) -> Vec<UdpSocket> {
    let clients = clients(flows);
    for round in 0..per_flow {
        send_round(&clients, addr, |flow| numbered(flow, round));
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
    }
    clients
}

/// Clients that sent datagrams and count the answers (each client its own 4-tuple).
pub struct Queries {
    clients: Vec<UdpSocket>,
    pub sent: usize,
    pub answered: usize,
}

impl Queries {
    /// Sends `per_flow` rounds of one 32-byte datagram from each of `flows` client sockets
    /// to `addr`, a round every `pace` (open loop: the rate does not follow the answers),
    /// reading nothing yet.
    pub fn send(addr: SocketAddr, flows: usize, per_flow: usize, pace: Duration) -> Queries {
        let clients = send_rounds(addr, flows, per_flow, Some(pace));
        Queries::reading(clients, flows * per_flow)
    }

    /// The clients that sent `sent` datagrams, set to read their answers without waiting.
    fn reading(clients: Vec<UdpSocket>, sent: usize) -> Queries {
        for client in &clients {
            client.set_nonblocking(true).unwrap();
        }
        Queries {
            clients,
            sent,
            answered: 0,
        }
    }

    /// As [`Queries::send`], for as long as an event takes: a round every `pace` until
    /// `done()` is true after at least `min_rounds`, at most `max_rounds` (open loop, bounded
    /// by its count). An emulated VM stretches both the load and what it waits for, so a
    /// fixed count that spans an event here can end before it there. `sent` says how many
    /// went.
    pub fn send_until(
        addr: SocketAddr,
        flows: usize,
        (min_rounds, max_rounds): (usize, usize),
        pace: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Queries {
        let clients = clients(flows);
        let mut rounds = 0;
        while rounds < max_rounds && (rounds < min_rounds || !done()) {
            send_round(&clients, addr, |flow| numbered(flow, rounds));
            rounds += 1;
            std::thread::sleep(pace);
        }
        Queries::reading(clients, flows * rounds)
    }

    /// Reads answers until `want` have come in all, or `within` passed; the count so far.
    pub fn answers(&mut self, want: usize, within: Duration) -> usize {
        self.read_answers(want, within, within)
    }

    /// Reads answers until none came for `quiet` (or all did, or `within` passed): what the
    /// servers that run answer while one is stopped. The count so far.
    pub fn answers_until_quiet(&mut self, quiet: Duration, within: Duration) -> usize {
        self.read_answers(self.sent, quiet, within)
    }

    fn read_answers(&mut self, want: usize, quiet: Duration, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut last_answer = Instant::now();
        let mut buf = [0u8; 64];
        while self.answered < want && Instant::now() < deadline && last_answer.elapsed() < quiet {
            let before = self.answered;
            for client in &self.clients {
                while client.recv(&mut buf).is_ok() {
                    self.answered += 1;
                }
            }
            if self.answered == before {
                std::thread::sleep(Duration::from_millis(10));
            } else {
                last_answer = Instant::now();
            }
        }
        self.answered
    }
}

/// Echo servers on `sockets` (one thread each, until `stop`): the plain control's
/// handlers. Bounded: each thread ends when `stop` is set.
pub fn echo_threads(
    sockets: Vec<Socket>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    sockets
        .into_iter()
        .map(|socket| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let socket: UdpSocket = socket.into();
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                socket.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((len, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..len], from);
                    }
                }
            })
        })
        .collect()
}

/// The UDP program's counters of each socket of a group, from its status.
pub fn program_counters(status: &parsrv::status::GroupStatus) -> Vec<UdpSlotCounters> {
    status
        .sockets
        .iter()
        .map(|s| {
            s.datagrams
                .as_ref()
                .expect("a UDP socket's status")
                .counters
        })
        .collect()
}

/// One counter summed over the sockets.
pub fn counter_sum(counters: &[UdpSlotCounters], field: fn(&UdpSlotCounters) -> u64) -> u64 {
    counters.iter().map(field).sum()
}

/// Flow mode: the program placed each of `flows` flows once and found every later datagram
/// of `datagrams` in its table (no flow placed twice).
pub fn each_flow_placed_once(
    counters: &[UdpSlotCounters],
    flows: usize,
    datagrams: usize,
    detail: &str,
) {
    assert_eq!(counter_sum(counters, |c| c.flows), flows as u64, "{detail}");
    assert_eq!(
        counter_sum(counters, |c| c.flow_datagrams),
        (datagrams - flows) as u64,
        "{detail}"
    );
}

/// The spawner `pid` holds one LRU hash (a UDP group's table: of flows, or of QUIC first
/// flights, keys of `key_size` bytes) of `entries`, and what `parsrv check` said of its
/// memory (`said`) is the kernel's own figure (`memlock`, counted as the map's usage since
/// Linux 6.4; it adds a few KiB of header and bucket locks).
pub fn lru_table_is_sized_as_said(pid: u32, entries: u32, key_size: usize, said: &str) {
    use parsrv_common::{reuseport::affinity::lru_table_bytes, udp::FlowEntry};
    const BPF_MAP_TYPE_LRU_HASH: u64 = 9;
    let mut tables = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(fd.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if field("map_type:") == Some(BPF_MAP_TYPE_LRU_HASH) {
            tables.push((field("max_entries:"), field("memlock:")));
        }
    }
    let estimate = lru_table_bytes(entries, key_size, size_of::<FlowEntry>());
    assert_eq!(
        tables.len(),
        1,
        "one LRU map, the group's table: {tables:?}"
    );
    assert_eq!(tables[0].0, Some(entries as u64), "{tables:?}");
    assert!(
        said.contains(&format!("{:.1} MiB", estimate as f64 / (1 << 20) as f64)),
        "{said}"
    );
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    if parsrv::features::KernelVersion::parse(&release).unwrap()
        >= parsrv::features::KernelVersion::parse("6.4").unwrap()
    {
        let kernel = tables[0].1.expect("memlock");
        assert!(
            (estimate..estimate + 64 * 1024).contains(&kernel),
            "estimated {estimate} bytes, the kernel says {kernel}"
        );
    }
}
