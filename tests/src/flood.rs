//! A SYN flood from spoofed sources, inside the test's network namespace: SYNs from
//! addresses of 198.51.100.0/24 (a documentation range) that never complete the handshake.
//!
//! The SYNs go in through a raw socket over loopback. The SYN-ACKs must leave without an
//! answer, or the handshakes would not stay pending: the spoofed range is routed to `lo`, so
//! a SYN-ACK comes back in for an address that is not local, and with forwarding off the
//! kernel drops it (its ICMP host-unreachable is not fatal to a pending handshake). So the
//! listener's SYN queue fills while its accept queue stays empty, as under a real flood,
//! with no tool, module or netfilter rule (the VMs have none).

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{addr, all_net_counters, wait_for, Outcome, SteadyLoad};

/// Where the spoofed SYNs come from.
pub const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);

/// SYNs sent at a steady rate until finished or for at most `limit`.
pub struct SynFlood {
    stop: Arc<AtomicBool>,
    sender: thread::JoinHandle<io::Result<u64>>,
}

impl SynFlood {
    /// Starts sending `per_second` SYNs to `target` (a local address), in the caller's
    /// network namespace.
    pub fn start(target: SocketAddrV4, per_second: u32, limit: Duration) -> io::Result<SynFlood> {
        route_spoofed_range_to_loopback()?;
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sender = thread::Builder::new()
            .name("syn-flood".into())
            .spawn(move || send_syns(&raw, target, per_second, limit, &flag))?;
        Ok(SynFlood { stop, sender })
    }

    /// Stops the flood; returns how many SYNs were sent.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sender
            .join()
            .expect("flood thread")
            .expect("sending SYNs")
    }
}

fn send_syns(
    raw: &socket2::Socket,
    target: SocketAddrV4,
    per_second: u32,
    limit: Duration,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let started = Instant::now();
    let destination = socket2::SockAddr::from(target);
    let mut sent = 0u64;
    // A different source address, port and sequence number for each SYN, deterministic.
    let mut state: u32 = 0x9e37_79b9;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        let due = (started.elapsed().as_secs_f64() * per_second as f64) as u64;
        while sent < due {
            let random = next();
            let source = Ipv4Addr::from(u32::from(SPOOFED) | (1 + random % 254));
            let port = 1024 + (random >> 8) as u16 % 60000;
            let packet = syn(source, port, *target.ip(), target.port(), next());
            raw.send_to(&packet, &destination)?;
            sent += 1;
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(sent)
}

/// An IPv4 TCP SYN (the kernel fills in the IP checksum and length of a raw packet).
fn syn(source: Ipv4Addr, port: u16, target: Ipv4Addr, target_port: u16, seq: u32) -> [u8; 40] {
    let mut packet = [0u8; 40];
    packet[0] = 0x45; // IPv4, 5-word header
    packet[8] = 64; // TTL
    packet[9] = libc::IPPROTO_TCP as u8;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&target.octets());
    let tcp = &mut packet[20..];
    tcp[0..2].copy_from_slice(&port.to_be_bytes());
    tcp[2..4].copy_from_slice(&target_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // 5-word header, no options
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // The checksum covers a pseudo-header: addresses, protocol, TCP length.
    let mut sum: u32 = 0;
    for pair in source.octets().chunks(2).chain(target.octets().chunks(2)) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    sum += libc::IPPROTO_TCP as u32 + 20;
    for pair in packet[20..].chunks(2) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    packet
}

/// `ip route add 198.51.100.0/24 dev lo`, through the routing ioctl (no tool needed).
fn route_spoofed_range_to_loopback() -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let sockaddr = |address: Ipv4Addr| {
        // SAFETY: sockaddr_in is plain data, and as large as sockaddr.
        unsafe {
            let mut inet: libc::sockaddr_in = std::mem::zeroed();
            inet.sin_family = libc::AF_INET as libc::sa_family_t;
            inet.sin_addr.s_addr = u32::from(address).to_be();
            std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet)
        }
    };
    let mut device = *b"lo\0";
    // SAFETY: rtentry is plain data; the ioctl reads it and the device name it points to.
    let rc = unsafe {
        let mut route: libc::rtentry = std::mem::zeroed();
        route.rt_dst = sockaddr(SPOOFED);
        route.rt_genmask = sockaddr(Ipv4Addr::new(255, 255, 255, 0));
        route.rt_flags = libc::RTF_UP;
        route.rt_dev = device.as_mut_ptr().cast();
        libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &route)
    };
    match rc {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            // Routed already (an earlier flood in this namespace).
            e if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            e => Err(e),
        },
    }
}

/// Handshakes in progress on listeners of the calling thread's namespace (SYN_RECV in
/// /proc/net/tcp), to see that a flood took hold.
pub fn pending_handshakes() -> usize {
    std::fs::read_to_string("/proc/thread-self/net/tcp")
        .expect("/proc/thread-self/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(3) == Some("03"))
        .count()
}

/// What real clients saw under a flood.
#[derive(Debug)]
pub struct Flooded {
    pub requests: usize,
    pub failed: usize,
    /// How the failed ones ended, counted.
    pub failures: HashMap<Outcome, usize>,
    /// Syncookies the kernel sent meanwhile: its SYN queues overflowed.
    pub syncookies_sent: u64,
    pub spoofed_syns: u64,
}

fn syncookies_sent() -> u64 {
    all_net_counters()
        .get("TcpExt.SyncookiesSent")
        .copied()
        .unwrap_or(0)
}

/// Floods whatever serves [`addr`] with `per_second` spoofed SYNs until `full` handshakes
/// are pending (the SYN queues are full), then runs 4 real clients for `load_for` under the
/// flood.
pub fn flooded_load(full: usize, per_second: u32, load_for: Duration) -> Flooded {
    let std::net::SocketAddr::V4(target) = addr() else {
        unreachable!("the test address is IPv4");
    };
    let cookies_before = syncookies_sent();
    let flood = SynFlood::start(target, per_second, load_for * 4).expect("flooding");
    assert!(
        wait_for(Duration::from_secs(10), || pending_handshakes() >= full),
        "the flood never filled the SYN queues: {} pending",
        pending_handshakes()
    );
    let started = Instant::now();
    let load = SteadyLoad::start(addr(), 4, load_for, Duration::from_secs(3));
    thread::sleep(load_for.saturating_sub(started.elapsed()));
    let outcomes = load.finish();
    let spoofed_syns = flood.finish();
    let mut failures = HashMap::new();
    for outcome in outcomes.iter().filter(|o| **o != Outcome::Ok) {
        *failures.entry(*outcome).or_insert(0) += 1;
    }
    Flooded {
        requests: outcomes.len(),
        failed: failures.values().sum(),
        failures,
        syncookies_sent: syncookies_sent() - cookies_before,
        spoofed_syns,
    }
}
