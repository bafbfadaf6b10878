//! Many clients on one machine: each its own source address (127.0.0.0/8 needs nothing;
//! IPv6 ones are added to the test namespace's loopback), and which handler answered them.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{read_answer, Outcome, HTTP_REQUEST};

/// `count` IPv4 clients, 127.1.0.1 onwards (every 127/8 address is local to loopback).
pub fn v4_clients(count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect()
}

/// `count` IPv6 clients, each in a /64 of its own under 2001:db8:c::/48 (documentation
/// range), added to this namespace's loopback; and the service address 2001:db8::80 beside
/// them, for a group on `[::]`.
pub fn v6_clients(count: usize) -> Vec<IpAddr> {
    let clients: Vec<IpAddr> = (0..count)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, i as u16, 0, 0, 0, 1)))
        .collect();
    for addr in clients.iter().chain([&service_v6()]) {
        add_address(*addr);
    }
    clients
}

/// A second address of `client`'s /64: the same client by the default prefix.
pub fn same_v6_client(client: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = client else {
        panic!("{client} is not IPv6")
    };
    let mut segments = v6.segments();
    segments[7] = 2;
    let other = IpAddr::V6(Ipv6Addr::from(segments));
    add_address(other);
    other
}

/// The IPv6 address [`v6_clients`] serves on.
pub fn service_v6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80))
}

fn add_address(addr: IpAddr) {
    let prefix = if addr.is_ipv6() { "128" } else { "32" };
    // (No `nodad`: the VMs' busybox `ip` does not know it.)
    let status = Command::new("ip")
        .args(["addr", "add", &format!("{addr}/{prefix}"), "dev", "lo"])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip addr add {addr}");
    // A new IPv6 address is tentative until the kernel's DAD work has run, even on loopback,
    // where it skips the probes: `ip` returns before, and a bind() meanwhile fails with
    // EADDRNOTAVAIL. Beside two VMs that work once ran late, and a request from an address
    // added a moment earlier failed (`Other`, 0.6 s into the test). Wait until it binds.
    let binds = || std::net::UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok();
    assert!(
        crate::wait_for(Duration::from_secs(10), binds),
        "{addr} never became usable (still tentative?)"
    );
}

/// Connects from `source` (any port).
pub fn connect_from(
    source: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, Outcome> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|_| Outcome::Other)?;
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .map_err(|_| Outcome::Other)?;
    match socket.connect_timeout(&addr.into(), timeout) {
        Ok(()) => Ok(socket.into()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Err(Outcome::ConnectTimeout)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(Outcome::Refused),
        Err(_) => Err(Outcome::Other),
    }
}

/// One HTTP request from `source`; the pid of the built-in handler that answered.
pub fn request_from(source: IpAddr, addr: SocketAddr, timeout: Duration) -> Result<u32, Outcome> {
    let mut stream = connect_from(source, addr, timeout)?;
    stream.write_all(HTTP_REQUEST).map_err(|_| Outcome::Reset)?;
    let answer = read_answer(&mut stream, timeout)?;
    answering_pid(&answer).ok_or(Outcome::Other)
}

/// The pid in a built-in handler's answer (`parsrv handler SLOT (pid PID)`).
pub fn answering_pid(answer: &str) -> Option<u32> {
    let (_, rest) = answer.split_once("(pid ")?;
    rest.split(')').next()?.parse().ok()
}
