//! For QUIC servers that are handlers of a `--udp-mode quic` group (docs/udp.md, "QUIC"):
//! every connection ID the server issues starts with its socket's cookie, so that the
//! group's program sends the connection's packets to this socket, whichever socket has room.
//!
//! ```no_run
//! let socket = parsrv::activation::udp_socket()?;
//! let cookie = parsrv::quic::socket_cookie(&socket)?;
//! // In the server's connection ID generator: the cookie, then random bytes.
//! let mut id = [0u8; 16];
//! // ... fill id with random bytes ...
//! parsrv::quic::write_cookie(cookie, &mut id);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `tests/examples/quic_handler.rs`, the quic mode's tests' server, does it with quinn's
//! `ConnectionIdGenerator`.

use std::{io, os::fd::AsFd};

pub use parsrv_common::udp::quic::{cookie, write_cookie, COOKIE_LEN, MAX_CID_LEN};

/// The cookie of `socket` (SO_COOKIE): what the group's program knows the socket by. It
/// stays the same while the socket lives, through restarts of its handler.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    crate::kernel::socket_cookie(socket.as_fd())
}
