//! A handler written only against the socket-activation protocol, as a server written for
//! systemd would be: one blocking `accept()` loop on the socket passed as fd 3, one
//! connection at a time, and an accept error ends it. It says `READY=1` by the notify
//! protocol once it has its socket (a no-op without `NOTIFY_SOCKET`: with parsrv's
//! `--notify`, it is ready when it says so, not after a second). It works because parsrv passes fd 3
//! blocking, as systemd does; with `--nonblocking` (systemd's `NonBlocking=yes`) accept()
//! fails with EAGAIN at once and this server exits, as such a server would under systemd.
//!
//!     parsrv run --listen 127.0.0.1:8080 --handlers 4 --handler exec -- \
//!         target/debug/examples/blocking_handler

use std::io::{Read, Write};

fn main() {
    let listener = match parsrv::activation::listener() {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("blocking_handler: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        eprintln!("blocking_handler: cannot say READY=1: {e}");
    }
    let body = format!("blocking handler pid {}\n", std::process::id());
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("blocking_handler: accept: {e}");
                std::process::exit(1);
            }
        };
        read_request_head(&mut conn); // one request per connection
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(response.as_bytes());
    }
}

/// Reads until the end of the request's head (or 4096 bytes, EOF or an error). A client may
/// send its request in several segments: answering after the first and closing with the
/// rest unread would make the kernel reset the connection (TCPAbortOnClose) before the
/// client reads the answer.
fn read_request_head(conn: &mut impl Read) {
    let mut head = [0u8; 4096];
    let mut len = 0;
    while len < head.len() && !head[..len].ends_with(b"\r\n\r\n") {
        match conn.read(&mut head[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    }
}
