//! The agent's connections to its peers: one it dials to each (hello, its table, then
//! whatever is broadcast) and one each peer dials to it, read only from a configured peer's
//! address, with TLS only from the host whose certificate it shows, each line bounded
//! before it is buffered.

use std::net::SocketAddr;

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
};

use super::{Shared, HELLO_TIMEOUT, REDIAL};
use crate::cluster::protocol::{self, Message, MAX_LINE};

/// Keeps a connection to peer `id` up, and sends on it: hello, this host's table, then
/// whatever is broadcast.
pub(super) async fn dial(agent: Shared, id: u16) {
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
    let stream = tokio::time::timeout(std::time::Duration::from_secs(1), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Takes the connections peers open, each read in a task of its own.
pub(super) async fn accept(agent: Shared, listener: TcpListener) {
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
    crate::procfs::neighbour_addresses(addr)
        .iter()
        .find_map(|mac| protocol::parse_mac(mac))
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

#[cfg(test)]
mod tests {
    use super::*;

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
