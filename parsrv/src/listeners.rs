//! A group's listening sockets: N SO_REUSEPORT sockets, one per handler, on the group's
//! addresses (slot i on address i % addresses). The kernel puts the sockets of one address in
//! one reuseport group; the SK_REUSEPORT program picks among them, and the sk_lookup program
//! moves connections between addresses.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use parsrv_common::reuseport::{LAST_RESORT_MARK, NO_HANDLER_MARK, RESTARTING_MARK};

use crate::{
    error::{Error, Result},
    kernel::{self, QueueDepth},
    spec::Transport,
};

/// Where a socket stands in the kernel's group, set by the spawner as its slot's handler
/// comes and goes ([`Listeners::set_state`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SocketState {
    /// In the group with its full queue length.
    #[default]
    Serving,
    /// In the group, marked (`NO_HANDLER_MARK`, its queue length unchanged) while its slot
    /// has no ready handler and has not had one since it started: the program sends it no new
    /// connection while another socket has a ready handler (that handler may never be
    /// ready), and what it has queued waits for the next handler.
    AwaitingHandler,
    /// In the group, marked (`RESTARTING_MARK`, its queue length unchanged) while its slot's
    /// handler, which was ready, is started again at once: as `AwaitingHandler`, except that
    /// when every socket with a handler is full the program queues the connection here, for
    /// the next handler, rather than dropping it.
    Restarting,
    /// Out of the group (shut down) while its handler waits out a restart delay: its queue
    /// moved to the other sockets.
    Parked,
    /// In the group, marked (`LAST_RESORT_MARK`) while its handler is stalled: it took no
    /// connection from its queue for `--stall-after`, so the queue was moved to the other
    /// sockets (by a shutdown and a listen() again, which the handler does not see) and the
    /// socket takes new connections only when every other is full (see [`crate::stall`]).
    Demoted,
    /// In the group, marked (`LAST_RESORT_MARK`), with a ready handler: a spare
    /// (`--spare`), which takes new connections only when every other socket is full.
    Spare,
}

/// One listening socket of the group.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// Where it is bound, and the index of that address among the group's.
    addr: SocketAddr,
    entry: u32,
    cookie: u64,
    state: SocketState,
    /// The accept-queue length the kernel set at listen() (min(backlog, somaxconn)); for a
    /// UDP socket, its receive buffer in bytes (SO_RCVBUF).
    capacity: u32,
    transport: Transport,
}

impl Listener {
    /// A listening socket (or a bound UDP socket) on `listen`, serving, with its cookie and
    /// the queue length (receive buffer) the kernel gives it now.
    fn of(
        socket: Socket,
        listen: SocketAddr,
        entry: u32,
        transport: Transport,
    ) -> Result<Listener> {
        let cookie = kernel::socket_cookie(socket.as_fd())
            .map_err(socket_error("read SO_COOKIE of", listen))?;
        let capacity = match transport {
            Transport::Tcp => {
                kernel::queue_depth(socket.as_fd())
                    .map_err(socket_error("read TCP_INFO of", listen))?
                    .capacity
            }
            Transport::Udp => socket
                .recv_buffer_size()
                .map_err(socket_error("read SO_RCVBUF of", listen))?
                as u32,
        };
        Ok(Listener {
            socket,
            addr: listen,
            entry,
            cookie,
            state: SocketState::Serving,
            capacity,
            transport,
        })
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The address and port it is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The index of its address among the group's (its `--listen` entry).
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// The queue length parsrv gave the socket; a handler that calls listen() again
    /// changes the kernel's (see [`Listener::queue`]).
    pub fn configured_capacity(&self) -> u32 {
        self.capacity
    }

    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    pub fn state(&self) -> SocketState {
        self.state
    }

    /// The accept queue, read exactly (TCP_INFO); a UDP socket has none (Unsupported).
    pub fn queue(&self) -> io::Result<QueueDepth> {
        if self.transport == Transport::Udp {
            return Err(io::ErrorKind::Unsupported.into());
        }
        kernel::queue_depth(self.socket.as_fd())
    }

    /// shutdown(): the socket leaves the kernel's group, and the kernel runs the program for
    /// each connection in its queue and each pending handshake (migration).
    fn leave_group(&self) -> Result<()> {
        self.socket
            .shutdown(std::net::Shutdown::Read)
            .map_err(socket_error(
                "take out of the group (shutdown) the socket on",
                self.addr,
            ))
    }

    /// listen() on the socket parsrv had taken out of the group, and the queue length the
    /// kernel gives it now: an adopted socket that was not listening (its last spawner died
    /// in the middle of a move) had none to read.
    fn listen_again(&mut self, backlog: u32) -> Result<()> {
        if self.transport == Transport::Udp {
            // Never out of the group: `Members::set_state` keeps a UDP socket in it, marked.
            return Ok(());
        }
        self.socket
            .listen(listen_backlog(backlog))
            .map_err(socket_error("listen again on", self.addr))?;
        self.capacity = kernel::queue_depth(self.socket.as_fd())
            .map_err(socket_error("read TCP_INFO of", self.addr))?
            .capacity;
        Ok(())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// A group's listening sockets, in slot order (slot i is the i-th socket to join the kernel's group).
#[derive(Debug)]
pub struct Listeners {
    /// Where the slots' sockets bind, a pattern that repeats: slot i binds
    /// `pattern[i % len]` (each `--listen` entry's address, its `=COUNT` times).
    pattern: Vec<SocketAddr>,
    transport: Transport,
    /// TCP: each socket's accept-queue length.
    backlog: u32,
    /// UDP: each socket's receive buffer (`sk_rcvbuf`) in bytes; 0: the kernel's default.
    receive_buffer: u32,
    /// O_NONBLOCK on every socket (see [`Listeners::set_nonblocking`]).
    nonblocking: bool,
    listeners: Vec<Listener>,
}

/// What [`Listeners::join_listener`] runs with a new socket's cookie before listen().
type BeforeListen<'a> = Box<dyn FnOnce(u64) -> Result<()> + 'a>;

impl Listeners {
    /// Creates `count` listening sockets on the addresses of `pattern` (slot i on
    /// `pattern[i % len]`), after making sure no socket outside this group holds an address:
    /// with SO_REUSEPORT and the same uid, ours would silently join a stranger's group and
    /// steer its connections.
    pub fn bind(
        pattern: &[SocketAddr],
        transport: Transport,
        count: u32,
        backlog: u32,
        receive_buffer: u32,
    ) -> Result<Self> {
        pattern
            .iter()
            .try_for_each(|addr| ensure_address_free(*addr, transport))?;
        let mut listeners = Listeners {
            pattern: pattern.to_vec(),
            transport,
            backlog,
            receive_buffer,
            nonblocking: true,
            listeners: Vec::with_capacity(count as usize),
        };
        for _ in 0..count {
            listeners.add_listener()?;
        }
        Ok(listeners)
    }

    /// Takes over the sockets of a running group ([`crate::spawner`]'s adoption), in slot
    /// order; where a slot's socket is gone (`None`), a new one joins the kernel's group,
    /// which the surviving sockets keep alive.
    ///
    /// The adopted group's program still runs: `before_listen(slot, cookie)` registers a new
    /// socket's cookie before it joins (see [`Listeners::join_listener`]).
    ///
    /// A new socket is `nonblocking` as the group says; an adopted one keeps the mode its
    /// handler left on it (the same open file is the handler's fd 3: a server that set
    /// O_NONBLOCK for its event loop, as parsrv's own built-in handlers do, must not find
    /// its socket blocking after an adoption, where its next read waits for ever).
    pub fn adopt(
        pattern: &[SocketAddr],
        transport: Transport,
        backlog: u32,
        receive_buffer: u32,
        nonblocking: bool,
        sockets: Vec<Option<Socket>>,
        mut before_listen: impl FnMut(u32, u64) -> Result<()>,
    ) -> Result<Self> {
        let mut listeners = Listeners {
            pattern: pattern.to_vec(),
            transport,
            backlog,
            receive_buffer,
            nonblocking,
            listeners: Vec::with_capacity(sockets.len()),
        };
        for (slot, socket) in (0..).zip(sockets) {
            match socket {
                Some(socket) => {
                    let (listen, entry) = listeners.next_addr();
                    let mut listener = Listener::of(socket, listen, entry, transport)?;
                    // A socket whose handler was not ready when the last spawner went.
                    match kernel::incoming_cpu(listener.as_fd()).ok() {
                        Some(NO_HANDLER_MARK) => listener.state = SocketState::AwaitingHandler,
                        Some(RESTARTING_MARK) => listener.state = SocketState::Restarting,
                        // A spare or a demoted socket: its handler's readiness (or the
                        // next look for stalls) says which it is now.
                        Some(LAST_RESORT_MARK) => listener.state = SocketState::Demoted,
                        _ => {}
                    }
                    listeners.listeners.push(listener);
                }
                None => {
                    listeners.join_listener(|cookie| before_listen(slot, cookie))?;
                }
            }
        }
        Ok(listeners)
    }

    /// The address the next slot's socket binds, and the index of its entry (its place
    /// among the pattern's distinct addresses: each entry binds an address of its own).
    fn next_addr(&self) -> (SocketAddr, u32) {
        let addr = self.pattern[self.listeners.len() % self.pattern.len()];
        let mut distinct: Vec<SocketAddr> = Vec::new();
        for a in &self.pattern {
            if !distinct.contains(a) {
                distinct.push(*a);
            }
        }
        let entry = distinct
            .iter()
            .position(|a| *a == addr)
            .expect("in the pattern");
        (addr, entry as u32)
    }

    /// Adds one listening socket, serving, to a group no program runs on yet (the next
    /// slot).
    fn add_listener(&mut self) -> Result<&Listener> {
        self.add(None)
    }

    /// Adds one listening socket to a group whose program runs (the next slot), marked as
    /// having no handler yet (`AwaitingHandler`). `before_listen` gets its cookie before
    /// bind() (UDP) or listen() (TCP) puts it in the kernel's group: a running program that
    /// meets a socket it cannot name fails open (`unknown_socket`, the kernel's hash
    /// decides), so the caller registers the cookie first; and the mark keeps the empty
    /// queue from looking like the best place until a handler is there.
    pub fn join_listener(
        &mut self,
        before_listen: impl FnOnce(u64) -> Result<()>,
    ) -> Result<&Listener> {
        self.add(Some(Box::new(before_listen)))
    }

    fn add(&mut self, joining: Option<BeforeListen<'_>>) -> Result<&Listener> {
        let (listen, entry) = self.next_addr();
        let socket_error = |action| socket_error(action, listen);
        let (kind, protocol) = match self.transport {
            Transport::Tcp => (Type::STREAM, Protocol::TCP),
            Transport::Udp => (Type::DGRAM, Protocol::UDP),
        };
        let socket = Socket::new(Domain::for_address(listen), kind, Some(protocol))
            .map_err(socket_error("create a socket for"))?;
        socket
            .set_reuse_port(true)
            .map_err(socket_error("set SO_REUSEPORT on"))?;
        // Lets a restarted spawner bind while connections of the last run sit in TIME_WAIT.
        // Not on UDP: there any other socket with SO_REUSEADDR, of any user, could bind the
        // same port beside the group (udp_lib_lport_inuse checks no uid for it).
        if self.transport == Transport::Tcp {
            socket
                .set_reuse_address(true)
                .map_err(socket_error("set SO_REUSEADDR on"))?;
        }
        socket
            .set_nonblocking(self.nonblocking)
            .map_err(socket_error("set the blocking mode of"))?;
        if self.transport == Transport::Udp && self.receive_buffer > 0 {
            force_receive_buffer(&socket, self.receive_buffer)
                .map_err(socket_error("set SO_RCVBUFFORCE on"))?;
        }
        // Marked and named before bind(): a UDP socket is in the kernel's group once bound
        // (a TCP one once listening), and the running program must know it from the first
        // datagram its hash sends there (as a socket without a handler, which it sends
        // elsewhere while another has room).
        let joins = joining.is_some();
        if let Some(before_listen) = joining {
            kernel::set_incoming_cpu(socket.as_fd(), NO_HANDLER_MARK)
                .map_err(socket_error("mark (no handler) the socket on"))?;
            let cookie =
                kernel::socket_cookie(socket.as_fd()).map_err(socket_error("read SO_COOKIE of"))?;
            before_listen(cookie)?;
        }
        socket.bind(&SockAddr::from(listen)).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                Error::AddressInUse { addr: listen }
            } else {
                socket_error("bind")(source)
            }
        })?;
        if self.transport == Transport::Tcp {
            socket
                .listen(listen_backlog(self.backlog))
                .map_err(socket_error("listen on"))?;
        }
        let mut listener = Listener::of(socket, listen, entry, self.transport)?;
        if joins {
            listener.state = SocketState::AwaitingHandler;
        }
        self.listeners.push(listener);
        Ok(self.listeners.last().expect("just pushed"))
    }

    /// Sets O_NONBLOCK on every socket, now and added later. A socket starts non-blocking;
    /// what a handler gets as fd 3 is the same open file, so this is the mode it inherits
    /// (systemd passes sockets blocking unless NonBlocking=yes). Nothing in the spawner
    /// accepts or reads on the sockets, so either mode suits it.
    pub fn set_nonblocking(&mut self, nonblocking: bool) -> Result<()> {
        self.nonblocking = nonblocking;
        for listener in &self.listeners {
            listener
                .socket
                .set_nonblocking(nonblocking)
                .map_err(socket_error("set the blocking mode of", listener.addr))?;
        }
        Ok(())
    }

    /// Moves socket `index` to `wanted`; says whether it came back from `Parked` (and so
    /// needs registering with the program again).
    ///
    /// - `Parked`: shut down, the socket leaves the group; the kernel runs the program for
    ///   each connection queued on it (which moves them to sockets with room), and no new
    ///   connection comes to it. It stays bound, and open in every process that holds it.
    /// - `AwaitingHandler`, `Restarting` and `Serving`: listen() again sets the queue
    ///   length, and puts a parked socket back in the group (the same socket, cookie and fd
    ///   everywhere).
    /// - `AwaitingHandler` and `Restarting`: the socket is marked (`SO_INCOMING_CPU` =
    ///   `NO_HANDLER_MARK` or `RESTARTING_MARK`), which the program reads; `Serving` clears
    ///   the mark. Neither touches the queue
    ///   length, so what the kernel admits stays as it was: a handshake in flight when the
    ///   handler died still completes into the queue, and a handler that called listen()
    ///   on its inherited socket (as gunicorn does) keeps the length it set.
    pub fn set_state(&mut self, index: usize, wanted: SocketState) -> Result<bool> {
        let backlog = self.backlog;
        let listener = &mut self.listeners[index];
        let listen = listener.addr;
        let was = listener.state;
        if was == wanted {
            return Ok(false);
        }
        match wanted {
            SocketState::Parked => listener.leave_group()?,
            SocketState::AwaitingHandler
            | SocketState::Restarting
            | SocketState::Demoted
            | SocketState::Spare => {
                // Marked before it rejoins the group, so that it never looks served.
                let mark = match wanted {
                    SocketState::AwaitingHandler => NO_HANDLER_MARK,
                    SocketState::Restarting => RESTARTING_MARK,
                    _ => LAST_RESORT_MARK,
                };
                kernel::set_incoming_cpu(listener.as_fd(), mark)
                    .map_err(socket_error("mark (no handler) the socket on", listen))?;
                if was == SocketState::Parked {
                    listener.listen_again(backlog)?;
                }
            }
            SocketState::Serving => {
                if was == SocketState::Parked {
                    listener.listen_again(backlog)?;
                }
                kernel::set_incoming_cpu(listener.as_fd(), -1).map_err(socket_error(
                    "clear the no-handler mark of the socket on",
                    listen,
                ))?
            }
        }
        listener.state = wanted;
        Ok(was == SocketState::Parked)
    }

    /// Moves the queue of socket `index` (in the group, state unchanged): shutdown() makes
    /// the kernel run the program for each queued connection and pending handshake, and
    /// listen() puts the socket back in the group at once. Back to back, because an accept()
    /// on it between the two fails with EINVAL; the caller registers it again. If listen()
    /// fails, the socket is left `Parked`.
    pub fn move_queue(&mut self, index: usize) -> Result<()> {
        let backlog = self.backlog;
        let listener = &mut self.listeners[index];
        listener.leave_group()?;
        if let Err(e) = listener.listen_again(backlog) {
            listener.state = SocketState::Parked;
            return Err(e);
        }
        Ok(())
    }

    /// Records that socket `index` is out of the group already (someone else shut it down),
    /// so that [`Listeners::set_state`] puts it back as from `Parked`.
    pub fn mark_parked(&mut self, index: usize) {
        self.listeners[index].state = SocketState::Parked;
    }

    /// Takes the last socket (the highest slot) out of the group's list; dropping it closes
    /// it. Shut it down first (`shutdown(Read)`) for its queue to migrate.
    pub fn remove_last(&mut self) -> Option<Listener> {
        self.listeners.pop()
    }

    /// Where the slots' sockets bind (see [`Listeners::bind`]).
    pub fn pattern(&self) -> &[SocketAddr] {
        &self.pattern
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }
}

/// The error of `action` on a socket for `addr`.
fn socket_error(action: &'static str, addr: SocketAddr) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Socket {
        action,
        addr,
        source,
    }
}

/// Makes `socket`'s receive buffer (`sk_rcvbuf`) `bytes`, whatever net.core.rmem_max says
/// (SO_RCVBUFFORCE: the spawner is root). The kernel doubles what it is given (for its own
/// overhead, socket(7)), so it is given half.
fn force_receive_buffer(socket: &Socket, bytes: u32) -> io::Result<()> {
    let value = (bytes / 2).min(i32::MAX as u32) as libc::c_int;
    // SAFETY: an int option of an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// listen()'s backlog argument for `backlog` (an int in the kernel's API).
fn listen_backlog(backlog: u32) -> i32 {
    backlog.min(i32::MAX as u32) as i32
}

/// Fails with a usage error naming the fix if an entry's addresses are not this host's: its
/// bound address, and for an IPv4 prefix its last address too (an IPv4 `local` route makes
/// every address of it bindable; IPv6 binds only assigned addresses, so a prefix's other
/// addresses are left to the routing table: see docs/addresses.md).
pub fn ensure_local(listen: &crate::spec::Listen) -> Result<()> {
    let mut probes = vec![listen.bind_addr()];
    if listen.addr.is_ipv4() && !listen.is_single() {
        probes.push(SocketAddr::new(listen.last_addr(), 0));
    }
    for addr in probes {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(socket_error("create a socket for", addr))?;
        let _ = probe.set_reuse_address(true);
        let _ = probe.set_reuse_port(true);
        match probe.bind(&SockAddr::from(SocketAddr::new(addr.ip(), 0))) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                return Err(crate::spec::invalid(
                    "--listen",
                    listen,
                    format!(
                        "{} is not an address of this host: add it (ip addr add {}/{} dev lo), \
                         or name one it has",
                        addr.ip(),
                        addr.ip(),
                        if addr.is_ipv4() { 32 } else { 128 }
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Fails with [`Error::AddressInUse`] if any socket already listens on `addr` (or on a
/// wildcard address covering it). A probe without SO_REUSEPORT cannot share the port, and
/// SO_REUSEADDR lets it ignore TIME_WAIT leftovers, which are harmless.
fn ensure_address_free(addr: SocketAddr, transport: Transport) -> Result<()> {
    let probe = match transport {
        Transport::Tcp => Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)),
        Transport::Udp => Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)),
    }
    .map_err(socket_error("create a socket for", addr))?;
    if transport == Transport::Tcp {
        let _ = probe.set_reuse_address(true);
    }
    match probe.bind(&SockAddr::from(addr)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Error::AddressInUse { addr }),
        Err(source) => Err(socket_error("bind", addr)(source)),
    }
}

/// Refuses to take a prefix or port range where a server already listens: the group's
/// sk_lookup program would take that server's connections, silently. (One address and
/// port are checked by binding: [`Listeners::bind`].)
pub fn ensure_range_free(entries: &[crate::spec::Listen]) -> Result<()> {
    let ranges: Vec<&crate::spec::Listen> = entries.iter().filter(|e| !e.is_single()).collect();
    if ranges.is_empty() {
        return Ok(());
    }
    let listening = crate::sock_diag::listening().map_err(Error::io(
        "listing this namespace's listening sockets (sock_diag)",
    ))?;
    for socket in listening {
        let at = crate::spec::Listen::single(socket.addr);
        if let Some(range) = ranges.iter().find(|r| r.overlaps(&at)) {
            return Err(Error::RangeTaken {
                range: range.to_string(),
                addr: socket.addr,
                owner: crate::sock_diag::owner_of(socket.inode).unwrap_or_else(|| {
                    format!("a process of uid {} (inode {})", socket.uid, socket.inode)
                }),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn builds_a_group_of_listeners_with_distinct_cookies() {
        let addr = free_port();
        let group = Listeners::bind(&[addr], Transport::Tcp, 3, 7, 0).unwrap();
        assert_eq!(group.listeners().len(), 3);
        let mut cookies: Vec<u64> = group.listeners().iter().map(Listener::cookie).collect();
        cookies.dedup();
        assert_eq!(cookies.len(), 3);
        for listener in group.listeners() {
            let queue = listener.queue().unwrap();
            assert_eq!(
                queue,
                QueueDepth {
                    depth: 0,
                    capacity: 7
                }
            );
            assert_eq!(
                listener.socket().local_addr().unwrap().as_socket(),
                Some(addr)
            );
        }
    }

    #[test]
    fn slots_bind_the_pattern_round_after_round() {
        let (a, b) = (free_port(), "127.0.0.2:0".parse::<SocketAddr>().unwrap());
        let b = std::net::TcpListener::bind(b)
            .unwrap()
            .local_addr()
            .unwrap();
        let group = Listeners::bind(&[a, a, b], Transport::Tcp, 5, 8, 0).unwrap();
        let placed: Vec<(SocketAddr, u32)> = group
            .listeners()
            .iter()
            .map(|l| {
                (
                    l.socket().local_addr().unwrap().as_socket().unwrap(),
                    l.entry(),
                )
            })
            .collect();
        assert_eq!(placed, [(a, 0), (a, 0), (b, 1), (a, 0), (a, 0)]);
    }

    #[test]
    fn refuses_an_address_a_plain_listener_holds() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let err = Listeners::bind(&[addr], Transport::Tcp, 2, 8, 0).unwrap_err();
        assert!(matches!(err, Error::AddressInUse { .. }), "{err}");
        assert!(err.to_string().contains("choose another --listen"));
    }

    #[test]
    fn refuses_to_join_a_foreign_reuseport_group() {
        let foreign = Listeners::bind(&[free_port()], Transport::Tcp, 1, 8, 0).unwrap();
        let err = Listeners::bind(foreign.pattern(), Transport::Tcp, 2, 8, 0).unwrap_err();
        assert!(matches!(err, Error::AddressInUse { .. }), "{err}");
    }
}
