//! The TCP sockets of this network namespace, from the kernel's sock_diag (netlink): the
//! listening ones, for which the kernel filters by state itself, so that the cost follows
//! the listeners, not the namespace's connections (reading /proc/net/tcp under tens of
//! thousands of connections took seconds); and the clients connected to a service.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// A listening socket: where it listens, its inode (to find its owner) and its owner's uid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listening {
    pub addr: SocketAddr,
    pub inode: u64,
    pub uid: u32,
}

/// Every listening TCP socket (IPv4 and IPv6) of the caller's network namespace.
pub fn listening() -> io::Result<Vec<Listening>> {
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, StateFlags::LISTEN, |socket| {
            let id = &socket.socket_id;
            found.push(Listening {
                addr: SocketAddr::new(id.source_address, id.source_port),
                inode: socket.inode as u64,
                uid: socket.uid,
            });
        })?;
    }
    Ok(found)
}

/// The addresses of the clients with a TCP connection to `service` (IPv4) in the caller's
/// network namespace, in any state but LISTEN: a handshake under way, established, or
/// closing (TIME_WAIT included).
pub fn clients_of(service: SocketAddrV4) -> io::Result<BTreeSet<Ipv4Addr>> {
    let mut clients = BTreeSet::new();
    dump(AF_INET, StateFlags::all() - StateFlags::LISTEN, |socket| {
        let id = &socket.socket_id;
        if id.source_address == IpAddr::V4(*service.ip()) && id.source_port == service.port() {
            if let IpAddr::V4(client) = id.destination_address {
                clients.insert(client);
            }
        }
    })?;
    Ok(clients)
}

/// Asks the kernel for every TCP socket of `family` in `states`, and passes each to `each`.
fn dump(
    family: u8,
    states: StateFlags,
    mut each: impl FnMut(&netlink_packet_sock_diag::inet::InetResponseHeader),
) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    each(&response.header)
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// "pid N (COMM)" of a process holding socket `inode`, from /proc/*/fd; None if none is
/// found (another namespace's process, or it closed).
pub fn owner_of(inode: u64) -> Option<String> {
    let pid = crate::procfs::socket_holder(inode)?;
    let comm = crate::procfs::comm(pid).unwrap_or_default();
    Some(format!("pid {pid} ({comm})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_clients_of_a_service_and_only_of_it() {
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = service.local_addr().unwrap() else {
            unreachable!("bound to IPv4");
        };
        assert!(clients_of(addr).unwrap().is_empty());
        // Two clients from two loopback addresses, and one of another service.
        let connect_from = |from: [u8; 4], to: SocketAddr| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
            socket.connect(&to.into()).unwrap();
            socket
        };
        let _a = connect_from([127, 0, 0, 2], addr.into());
        let _b = connect_from([127, 0, 0, 3], addr.into());
        let _c = connect_from([127, 0, 0, 4], other.local_addr().unwrap());
        assert_eq!(
            clients_of(addr).unwrap(),
            [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)].into()
        );
    }

    #[test]
    fn finds_a_listener_of_ours_with_its_inode_and_not_a_connection() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let found = listening().unwrap();
        let ours: Vec<&Listening> = found.iter().filter(|l| l.addr == addr).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        assert_eq!(
            link.to_str().unwrap(),
            format!("socket:[{}]", ours[0].inode)
        );
        let owner = owner_of(ours[0].inode).unwrap();
        assert!(
            owner.starts_with(&format!("pid {} (", std::process::id())),
            "{owner}"
        );
    }
}
