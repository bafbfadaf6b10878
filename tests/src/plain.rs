//! A plain SO_REUSEPORT group without parsrv: the control every comparison needs.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    thread,
    time::Duration,
};

/// A plain SO_REUSEPORT group with no program, for control runs in the same test: `count`
/// sockets on `addr`; the sockets whose index is in `serving` get a thread that answers
/// HTTP like parsrv's http handler; the others never accept. Stops when dropped.
pub struct PlainGroup {
    pub sockets: Vec<Arc<socket2::Socket>>,
    stop: Arc<AtomicBool>,
    servers: Vec<thread::JoinHandle<()>>,
}

impl PlainGroup {
    pub fn start(addr: SocketAddr, count: usize, backlog: i32, serving: &[usize]) -> PlainGroup {
        let sockets: Vec<_> = (0..count)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )
                .unwrap();
                s.set_reuse_port(true).unwrap();
                // As parsrv's own sockets: without it, the TIME_WAIT connections of this
                // group would keep the next server (parsrv in the same test) off the port.
                s.set_reuse_address(true).unwrap();
                s.bind(&addr.into()).unwrap();
                s.listen(backlog).unwrap();
                s.set_nonblocking(true).unwrap();
                Arc::new(s)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let servers = serving
            .iter()
            .map(|&i| {
                let (socket, stop) = (sockets[i].clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match socket.accept() {
                            Ok((conn, _)) => {
                                let mut conn: TcpStream = conn.into();
                                conn.set_nonblocking(false).unwrap();
                                thread::spawn(move || answer_http(&mut conn));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        PlainGroup {
            sockets,
            stop,
            servers,
        }
    }
}

fn answer_http(conn: &mut TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ =
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nplain\n");
}

impl Drop for PlainGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}
