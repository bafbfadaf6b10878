//! What parsrv asks of the running kernel: struct offsets from BTF, capabilities, bpffs, and
//! exact per-listener queue depths.

use std::{
    ffi::CString,
    io::{self, Write as _},
    mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use btf_rs::{Backend, Btf, Type};
use parsrv_common::reuseport::KernelOffsets;

use crate::{
    error::{Error, Result},
    procfs::{self, effective_capabilities},
};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Overrides [`VMLINUX_BTF`], for kernels that ship BTF as a separate file.
pub const VMLINUX_BTF_ENV: &str = "PARSRV_VMLINUX_BTF";

pub fn vmlinux_btf_path() -> PathBuf {
    std::env::var_os(VMLINUX_BTF_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(VMLINUX_BTF))
}

/// A kernel's BTF, indexed as [`vmlinux_btf`] does, with the look-ups of types by name
/// remembered: btf-rs's index reads every type's name for each look-up (about 130,000 types
/// on 6.18), and a spawner's start asked for 10 names 26 times (the features, the programs'
/// offsets, the audit's): 14 % of its CPU time, 27 % once the verifier walked its program
/// only once (perf, 6.18, 2026-12-07).
pub struct KernelBtf {
    btf: Btf,
    by_name: std::cell::RefCell<std::collections::HashMap<String, Vec<Type>>>,
}

impl KernelBtf {
    /// The types named `name` (empty when there is none).
    pub fn types_named(&self, name: &str) -> Vec<Type> {
        if let Some(types) = self.by_name.borrow().get(name) {
            return types.clone();
        }
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        self.by_name
            .borrow_mut()
            .insert(name.to_owned(), types.clone());
        types
    }
}

impl From<Btf> for KernelBtf {
    fn from(btf: Btf) -> Self {
        KernelBtf {
            btf,
            by_name: Default::default(),
        }
    }
}

impl std::ops::Deref for KernelBtf {
    type Target = Btf;
    fn deref(&self) -> &Btf {
        &self.btf
    }
}

/// Reads the offsets the program needs from the running kernel's BTF.
pub fn kernel_offsets() -> Result<KernelOffsets> {
    offsets_in(&vmlinux_btf()?)
}

/// The running kernel's BTF, indexed for look-ups (once per start).
///
/// btf-rs's memory-mapped backend only indexes where each type starts and parses a type when
/// it is looked up; its default backend parses all of them (about 130,000 on 6.18) into a
/// cache first. parsrv looks up a few dozen, so the index is the cheaper way: 13-18 ms
/// instead of 71-100 ms here (release, 3 runs each, 2026-12-06), and a spawner's start parses
/// BTF under emulation too. `/sys/kernel/btf/vmlinux` can be mapped from Linux 6.16 on;
/// before, the file is read whole into a memfd, which can.
pub fn vmlinux_btf() -> Result<KernelBtf> {
    let path = vmlinux_btf_path();
    if !path.is_file() {
        return Err(Error::NoBtf { path });
    }
    let unreadable = |e: String| Error::BtfLayout {
        path: path.clone(),
        what: format!("a readable BTF ({e})"),
    };
    if let Ok(btf) = Btf::from_file_with_backend(&path, Backend::Mmap) {
        return Ok(btf.into());
    }
    let bytes = std::fs::read(&path).map_err(|e| unreadable(e.to_string()))?;
    btf_in_memory(&bytes).map_err(|e| unreadable(e.to_string()))
}

/// `bytes` indexed as [`vmlinux_btf`] does, through a memfd (a file that can be mapped).
fn btf_in_memory(bytes: &[u8]) -> std::result::Result<KernelBtf, Box<dyn std::error::Error>> {
    let copy = memfd_with(bytes)?;
    let path = procfs::own_fd_path(copy.as_raw_fd());
    // The mapping keeps the memfd's pages when `copy` closes.
    Ok(Btf::from_file_with_backend(path, Backend::Mmap)?.into())
}

/// An anonymous file holding `bytes` (closed on exec).
fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and known flags; the fd returned is ours alone.
    let fd = unsafe { libc::memfd_create(c"parsrv-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    (&file).write_all(bytes)?;
    Ok(file.into())
}

/// The offsets the program needs, from the running kernel's parsed BTF.
pub fn offsets_in(btf: &KernelBtf) -> Result<KernelOffsets> {
    let path = vmlinux_btf_path();
    let layout = |structure: &str, members: &[&str], size: usize| {
        member_offset(btf, structure, members, size).map_err(|what| Error::BtfLayout {
            path: path.clone(),
            what,
        })
    };
    let offsets = KernelOffsets {
        sk_ack_backlog: layout("sock", &["sk_ack_backlog"], 4)?,
        sk_max_ack_backlog: layout("sock", &["sk_max_ack_backlog"], 4)?,
        sk_reuseport_cb: layout("sock", &["sk_reuseport_cb"], 8)?,
        skc_cookie: layout("sock", &["__sk_common", "skc_cookie"], 8)?,
        skc_incoming_cpu: layout("sock", &["__sk_common", "skc_incoming_cpu"], 4)?,
        accept_queue_qlen: layout("inet_connection_sock", &["icsk_accept_queue", "qlen"], 4)?,
        reuseport_num_socks: layout("sock_reuseport", &["num_socks"], 2)?,
        reuseport_socks: layout("sock_reuseport", &["socks"], 0)?,
    };
    // The program reads both queue fields with one 8-byte read.
    if offsets.sk_max_ack_backlog != offsets.sk_ack_backlog + 4 {
        return Err(Error::BtfLayout {
            path,
            what: "struct sock.sk_max_ack_backlog right after sk_ack_backlog".into(),
        });
    }
    Ok(offsets)
}

/// The offsets the UDP datagram program needs (`parsrv_common::udp`), from the running
/// kernel's parsed BTF.
pub fn udp_offsets_in(btf: &KernelBtf) -> Result<parsrv_common::udp::UdpOffsets> {
    Ok(parsrv_common::udp::UdpOffsets {
        // `sk_rmem_alloc` is a macro for sk_backlog.rmem_alloc, an atomic_t.
        sk_rmem_alloc: layout(btf, "sock", &["sk_backlog", "rmem_alloc"], 4)?,
        sk_rcvbuf: layout(btf, "sock", &["sk_rcvbuf"], 4)?,
        sk_reuseport_cb: layout(btf, "sock", &["sk_reuseport_cb"], 8)?,
        skc_cookie: layout(btf, "sock", &["__sk_common", "skc_cookie"], 8)?,
        skc_incoming_cpu: layout(btf, "sock", &["__sk_common", "skc_incoming_cpu"], 4)?,
        reuseport_num_socks: layout(btf, "sock_reuseport", &["num_socks"], 2)?,
        reuseport_socks: layout(btf, "sock_reuseport", &["socks"], 0)?,
    })
}

/// Byte offset of `members` inside struct `structure` in `btf` (see [`member_offset`]), as
/// the error a user reads when the kernel's layout is not the one parsrv reads.
pub fn layout(btf: &KernelBtf, structure: &str, members: &[&str], size: usize) -> Result<u32> {
    member_offset(btf, structure, members, size).map_err(|what| Error::BtfLayout {
        path: vmlinux_btf_path(),
        what,
    })
}

/// Byte offset of `members` (a path through nested members, looking through anonymous
/// structs and unions) inside struct `structure`. `size`, when not 0, is the byte size the
/// program reads there, and must match the member's type, so that a kernel whose field
/// changed width is refused instead of misread.
fn member_offset(
    btf: &KernelBtf,
    structure: &str,
    members: &[&str],
    size: usize,
) -> Result<u32, String> {
    let what = || format!("struct {structure}.{}", members.join("."));
    let mut current = btf
        .types_named(structure)
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(what)?;
    let mut offset_bits = 0u32;
    for name in members {
        let (bits, ty) = find_member(btf, &current, name).ok_or_else(what)?;
        offset_bits += bits;
        current = ty;
    }
    if !offset_bits.is_multiple_of(8) {
        return Err(format!("{} at a byte boundary", what()));
    }
    if size != 0 && type_size(btf, &current) != Some(size) {
        return Err(format!("{} of {size} bytes", what()));
    }
    Ok(offset_bits / 8)
}

/// Finds `name` among the members of a struct or union, descending into anonymous members.
/// Returns its bit offset and its type with typedefs and qualifiers peeled off.
pub(crate) fn find_member(btf: &Btf, container: &Type, name: &str) -> Option<(u32, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = container else {
        return None;
    };
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let ty = peel(btf, btf.resolve_chained_type(member).ok()?)?;
        if member_name == name {
            return Some((member.bit_offset(), ty));
        }
        if member_name.is_empty() {
            if let Some((bits, found)) = find_member(btf, &ty, name) {
                return Some((member.bit_offset() + bits, found));
            }
        }
    }
    None
}

fn peel(btf: &Btf, mut ty: Type) -> Option<Type> {
    loop {
        match &ty {
            Type::Typedef(_)
            | Type::Volatile(_)
            | Type::Const(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                ty = btf.resolve_chained_type(ty.as_btf_type()?).ok()?;
            }
            _ => return Some(ty),
        }
    }
}

fn type_size(_btf: &Btf, ty: &Type) -> Option<usize> {
    match ty {
        Type::Int(i) => Some(i.size()),
        Type::Ptr(_) => Some(8),
        Type::Struct(s) | Type::Union(s) => Some(s.size()),
        Type::Enum(e) => Some(e.size()),
        _ => None,
    }
}

// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
pub(crate) const CAP_BPF: u32 = 39;

fn has_capability(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// What loading and attaching the programs needs: a name, and the capabilities any one of
/// which serves.
const FOR_THE_PROGRAMS: &[(&str, &[u32])] = &[
    // Loading.
    ("CAP_BPF", &[CAP_BPF]),
    // bpf_probe_read_kernel and the pointer reads in the programs.
    ("CAP_PERFMON", &[CAP_PERFMON]),
    // A group's socket maps (SOCKMAP) and the cluster's tc program. Newer kernels also take
    // CAP_SYS_ADMIN for them (bpf_net_capable()), but 6.1's sock_map_alloc asks for
    // CAP_NET_ADMIN alone: without it the map's creation failed with EPERM after the program
    // had been checked (docs/operations.md, "Capabilities").
    ("CAP_NET_ADMIN", &[CAP_NET_ADMIN]),
];

/// Fails with the list of missing capabilities unless this process may load and attach the
/// programs ([`FOR_THE_PROGRAMS`]).
pub fn check_capabilities() -> Result<()> {
    let caps = effective_capabilities().map_err(Error::io("reading /proc/self/status"))?;
    let missing = missing_capabilities(caps, FOR_THE_PROGRAMS);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingCapabilities {
            missing: missing.join(" and "),
        })
    }
}

/// The names of `needed` none of whose capabilities is in `caps`.
fn missing_capabilities(caps: u64, needed: &[(&'static str, &[u32])]) -> Vec<&'static str> {
    needed
        .iter()
        .filter(|(_, any_of)| !any_of.iter().any(|&cap| has_capability(caps, cap)))
        .map(|(name, _)| *name)
        .collect()
}

/// What a spawner needs to run handlers as another user (`--user`), beyond the program's
/// capabilities, each found missing by running under a bounding set without it
/// (docs/operations.md, "Capabilities"): a name, and the capabilities any one of which
/// serves. Without one, handlers failed to start, a stop waited for ever (no signal reached
/// them) or an upgrade killed what it could not adopt.
const FOR_HANDLERS_OF_ANOTHER_USER: &[(&str, &[u32])] = &[
    ("CAP_SETUID", &[CAP_SETUID]),
    ("CAP_SETGID", &[CAP_SETGID]),
    // Emptying the handlers' bounding set.
    ("CAP_SETPCAP", &[CAP_SETPCAP]),
    // Giving them their counters page and notify socket.
    ("CAP_CHOWN", &[CAP_CHOWN]),
    // Stopping them.
    ("CAP_KILL", &[CAP_KILL]),
    // Adopting them: their fds (pidfd_getfd) and /proc/PID/environ (mode 0400, theirs).
    ("CAP_SYS_PTRACE", &[CAP_SYS_PTRACE]),
    (
        "CAP_DAC_READ_SEARCH",
        &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE],
    ),
];

/// Fails naming what is missing if a group runs its handlers as another user and this
/// process lacks a capability that takes: checked before anything is created, rather than
/// found out when a handler will not start or stop.
pub fn check_capabilities_for(groups: &[crate::spec::GroupSpec]) -> Result<()> {
    let Some(group) = groups.iter().find(|g| g.user.is_some()) else {
        return Ok(());
    };
    let caps = effective_capabilities().map_err(Error::io("reading /proc/self/status"))?;
    let missing = missing_capabilities(caps, FOR_HANDLERS_OF_ANOTHER_USER);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::MissingHandlerCapabilities {
        group: group.name.clone(),
        missing: missing.join(", "),
    })
}

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure bpffs is mounted at `path`, mounting it if it is not.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    if is_bpffs(path) {
        return Ok(());
    }
    let no_bpffs = |source| Error::NoBpffs {
        path: path.to_owned(),
        source,
    };
    if !has_capability(effective_capabilities().unwrap_or(0), CAP_SYS_ADMIN) {
        return Err(no_bpffs(io::Error::from_raw_os_error(libc::EPERM)));
    }
    std::fs::create_dir_all(path).map_err(no_bpffs)?;
    // As systemd mounts it: only root may look in (bpffs defaults to 1777, where a local
    // user could plant a directory parsrv then trusts).
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| no_bpffs(e.into()))?;
    log::info!("mounted bpffs at {}", path.display());
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a statfs buffer of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// A listener's accept queue as the kernel reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueDepth {
    /// Established connections waiting for accept() (`sk_ack_backlog`).
    pub depth: u32,
    /// `sk_max_ack_backlog`: min(listen backlog, net.core.somaxconn). The queue is full
    /// above this: it holds `capacity + 1`.
    pub capacity: u32,
}

impl QueueDepth {
    /// Connections it can still take before the kernel calls it full.
    pub fn free(&self) -> u32 {
        (self.capacity + 1).saturating_sub(self.depth)
    }
}

/// A UDP socket's receive buffer as the kernel accounts it (SO_MEMINFO).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveBuffer {
    /// Bytes its queued datagrams hold (`sk_rmem_alloc`: their truesize, not their payload).
    pub used: u32,
    /// `sk_rcvbuf`: the most `used` may reach.
    pub size: u32,
    /// Datagrams the kernel dropped at it since it was created (`sk_drops`): its buffer was
    /// full (Udp RcvbufErrors), or a checksum or filter refused them.
    pub drops: u32,
}

/// A socket's receive buffer, read with SO_MEMINFO (Linux 4.6+): exact and lock-free.
pub fn receive_buffer(fd: BorrowedFd<'_>) -> io::Result<ReceiveBuffer> {
    // SK_MEMINFO_VARS is 9 since Linux 4.x: RMEM_ALLOC, RCVBUF, ..., DROPS last.
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ReceiveBuffer {
        used: info[0],
        size: info[1],
        drops: info[8],
    })
}

/// Several accept queues together: what waits in them, and what they hold (the sum of
/// `capacity + 1`), for a group's occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Occupancy {
    pub queued: u32,
    pub capacity: u32,
}

impl Occupancy {
    pub fn of(queues: impl IntoIterator<Item = QueueDepth>) -> Self {
        queues
            .into_iter()
            .fold(Occupancy::default(), |sum, q| Occupancy {
                queued: sum.queued + q.depth,
                capacity: sum.capacity + q.capacity + 1,
            })
    }
}

/// Reads a listener's queue with getsockopt(TCP_INFO): on a LISTEN socket, tcpi_unacked is
/// sk_ack_backlog and tcpi_sacked is sk_max_ack_backlog. Exact and lock-free.
pub fn queue_depth(fd: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    let info = tcp_info(fd)?;
    Ok(QueueDepth {
        depth: info.tcpi_unacked,
        capacity: info.tcpi_sacked,
    })
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: buffer and length describe a tcp_info.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// TCP's state of the socket (`TCP_LISTEN`, `TCP_CLOSE`, ...), from TCP_INFO.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    Ok(tcp_info(fd)?.tcpi_state)
}

/// `TCP_LISTEN` in the kernel's `enum tcp_state` (include/net/tcp_states.h).
pub const TCP_LISTEN: u8 = 10;

/// A `SOL_SOCKET` option of a plain-number type.
fn socket_option<T: Copy + Default>(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: buffer and length describe one T.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A socket's `SO_INCOMING_CPU` (-1 unless set): on a listener, parsrv's "no handler"
/// mark ([`parsrv_common::reuseport::NO_HANDLER_MARK`]).
pub fn incoming_cpu(fd: BorrowedFd<'_>) -> io::Result<i32> {
    socket_option(fd, libc::SO_INCOMING_CPU)
}

/// Sets a socket's `SO_INCOMING_CPU` (see [`incoming_cpu`]); any value is taken.
pub fn set_incoming_cpu(fd: BorrowedFd<'_>, cpu: i32) -> io::Result<()> {
    // SAFETY: the value is an i32 of the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&cpu as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The socket's cookie, created on first use: the program finds listeners by cookie, and
/// `skc_cookie` stays 0 until something asks for it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    socket_option(fd, libc::SO_COOKIE)
}

/// The inode number of a socket (as /proc shows it: `socket:[INODE]`).
pub fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}

/// The listening TCP sockets process `pid` holds, as (inode, local address): each socket
/// among its fds (/proc/PID/fd) is looked at through a copy taken with pidfd_getfd
/// (SO_ACCEPTCONN, getsockname). The cost follows the process's own fds, not the host's
/// sockets: /proc/net/tcp lists every socket of the namespace, and reading it under a busy
/// server's tens of thousands of connections held the spawner for seconds.
pub fn listening_sockets(pid: u32) -> Vec<(u64, String)> {
    let sockets: Vec<(RawFd, u64)> = procfs::socket_fds(pid).collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    // SAFETY: plain syscall; the result is checked and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Vec::new();
    }
    // SAFETY: a fresh fd from pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    sockets
        .into_iter()
        .filter_map(|(number, inode)| {
            // SAFETY: plain syscall; the result is checked and owned below.
            let copy =
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), number, 0) };
            if copy < 0 {
                return None;
            }
            // SAFETY: a fresh fd from pidfd_getfd.
            let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(copy as RawFd) });
            let tcp = socket.r#type().ok()? == socket2::Type::STREAM
                && socket
                    .protocol()
                    .ok()?
                    .is_none_or(|p| p == socket2::Protocol::TCP);
            let listening =
                nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::AcceptConn)
                    .ok()?;
            let local = socket.local_addr().ok()?.as_socket()?;
            (tcp && listening).then(|| (inode, local.to_string()))
        })
        .collect()
}

/// Why root should not trust what is at a path with these metadata (owned by another
/// user, or writable by group or others), if it should not. As OpenSSH's StrictModes: the
/// owner must be root or the user parsrv runs as (root, but for unit tests and `parsrv
/// check` run by a user).
pub fn untrusted_because(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// The soft limit on open files parsrv started with (0: not raised), which handlers get back.
static STARTED_FD_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises this process's soft limit on open files to its hard limit, as daemons that hold
/// many sockets do (the hard limit is the administrator's: `LimitNOFILE=` in the unit). A
/// spawner holds every slot's socket, pidfd, pipes and the admin endpoint's connections;
/// with the usual soft limit of 1,024 a busy endpoint alone could exhaust it. Handlers get
/// the old soft limit back ([`restore_fd_limit`]): some servers still use select().
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let started = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            STARTED_FD_LIMIT.store(started, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Puts back the soft limit parsrv started with. Async-signal-safe: for a forked handler.
pub fn restore_fd_limit() {
    let started = STARTED_FD_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if started == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = started;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The running kernel's release and build (`uname -r` and `uname -v`): two builds of one
/// release can verify the same program differently.
pub fn kernel_build() -> String {
    nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} ({})",
                u.release().to_string_lossy(),
                u.version().to_string_lossy()
            )
        })
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_listening_sockets_with_addresses() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let found = listening_sockets(std::process::id());
        for listener in [&v4, &v6] {
            let inode = socket_inode(std::os::fd::AsFd::as_fd(listener)).unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            assert!(
                found.contains(&(inode, addr.clone())),
                "{addr} not in {found:?}"
            );
        }
    }

    #[test]
    fn capability_bits() {
        let caps = (1u64 << CAP_BPF) | (1 << CAP_SYS_ADMIN);
        assert!(has_capability(caps, CAP_BPF));
        assert!(!has_capability(caps, CAP_PERFMON));
    }

    #[test]
    fn the_programs_need_net_admin_for_their_socket_maps_even_with_sys_admin() {
        let loader = (1u64 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(
            missing_capabilities(loader | (1 << CAP_SYS_ADMIN), FOR_THE_PROGRAMS),
            ["CAP_NET_ADMIN"]
        );
        assert!(missing_capabilities(loader | (1 << CAP_NET_ADMIN), FOR_THE_PROGRAMS).is_empty());
        assert_eq!(
            missing_capabilities(1 << CAP_NET_ADMIN, FOR_THE_PROGRAMS),
            ["CAP_BPF", "CAP_PERFMON"]
        );
    }

    #[test]
    fn udp_offsets_from_running_kernel_btf_agree_with_the_tcp_ones() {
        let btf = vmlinux_btf().unwrap();
        let tcp = offsets_in(&btf).unwrap();
        let udp = udp_offsets_in(&btf).unwrap();
        assert_eq!(
            (udp.sk_reuseport_cb, udp.skc_cookie, udp.skc_incoming_cpu),
            (tcp.sk_reuseport_cb, tcp.skc_cookie, tcp.skc_incoming_cpu)
        );
        assert_ne!(udp.sk_rmem_alloc, udp.sk_rcvbuf);
        assert!(udp.sk_rmem_alloc > 0 && udp.sk_rcvbuf > 0, "{udp:?}");
    }

    /// Needs only a readable /sys/kernel/btf/vmlinux (no privilege), which every kernel
    /// parsrv supports has; on a machine without it the test says so and fails.
    #[test]
    fn offsets_from_running_kernel_btf_are_plausible() {
        let offsets = kernel_offsets().expect("kernel BTF");
        // Layout facts that hold on every kernel: the queue fields are adjacent u32s,
        // sock_common comes first in struct sock, and socks[] follows the header.
        assert_eq!(offsets.sk_max_ack_backlog, offsets.sk_ack_backlog + 4);
        assert!(offsets.skc_cookie < 136, "{offsets:?}");
        assert!(offsets.reuseport_num_socks < offsets.reuseport_socks);
        assert!(offsets.accept_queue_qlen > offsets.sk_reuseport_cb);
    }

    /// The index through a memfd (kernels whose sysfs BTF cannot be mapped) and btf-rs's
    /// whole parse find the same layout as the mapped file.
    #[test]
    fn every_way_of_reading_btf_finds_the_same_offsets() {
        let bytes = std::fs::read(vmlinux_btf_path()).expect("kernel BTF");
        let mapped = offsets_in(&vmlinux_btf().unwrap()).unwrap();
        let copied = offsets_in(&btf_in_memory(&bytes).unwrap()).unwrap();
        let parsed = offsets_in(&Btf::from_bytes(&bytes).unwrap().into()).unwrap();
        assert_eq!(copied, mapped);
        assert_eq!(parsed, mapped);
        assert!(btf_in_memory(b"not BTF").is_err());
    }

    /// A look-up by name answers as btf-rs's, the second time from what the first kept.
    #[test]
    fn a_look_up_by_name_is_remembered_and_answers_as_btf_rs_does() {
        let btf = vmlinux_btf().expect("kernel BTF");
        for name in ["sock", "bpf_prog_type", "no_such_type_in_any_kernel"] {
            // Each type's kind and name.
            let described = |types: Vec<Type>| -> Vec<(&'static str, Option<String>)> {
                types
                    .iter()
                    .map(|t| {
                        let name = t.as_btf_type().and_then(|b| btf.resolve_name(b).ok());
                        (t.name(), name)
                    })
                    .collect()
            };
            let direct = described(btf.resolve_types_by_name(name).unwrap_or_default());
            for _ in 0..2 {
                let named = described(btf.types_named(name));
                assert_eq!(named, direct, "{name}");
            }
            assert!(btf.by_name.borrow().contains_key(name), "{name}");
        }
        assert!(!btf.types_named("sock").is_empty());
    }

    #[test]
    fn a_missing_member_is_named() {
        let btf = vmlinux_btf().expect("kernel BTF");
        let err = member_offset(&btf, "sock", &["no_such_member"], 4).unwrap_err();
        assert_eq!(err, "struct sock.no_such_member");
        let err = member_offset(&btf, "sock", &["sk_ack_backlog"], 8).unwrap_err();
        assert!(err.contains("of 8 bytes"), "{err}");
    }

    #[test]
    fn queue_depth_of_a_fresh_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = queue_depth(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        assert_eq!(before.depth, 0);
        assert!(before.capacity > 0);
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // The handshake completes in the kernel: one connection waits for accept().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while queue_depth(std::os::fd::AsFd::as_fd(&listener))
            .unwrap()
            .depth
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "connection never queued"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let cookie = socket_cookie(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(
            socket_cookie(std::os::fd::AsFd::as_fd(&listener)).unwrap(),
            cookie
        );
    }
}
