//! The listening TCP sockets of this network namespace, from the kernel's sock_diag
//! (netlink), which filters by state itself: the cost follows the listeners, not the
//! namespace's connections (reading /proc/net/tcp under tens of thousands of connections
//! took seconds).

use std::{io, net::SocketAddr};

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
        dump(family, &mut found)?;
    }
    Ok(found)
}

fn dump(family: u8, found: &mut Vec<Listening>) -> io::Result<()> {
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
            states: StateFlags::LISTEN,
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
                    let id = &response.header.socket_id;
                    found.push(Listening {
                        addr: SocketAddr::new(id.source_address, id.source_port),
                        inode: response.header.inode as u64,
                        uid: response.header.uid,
                    });
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
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let holds = std::fs::read_dir(entry.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
                });
            holds.then(|| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("pid {pid} ({})", comm.trim())
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
