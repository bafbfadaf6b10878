//! The running kernel's BTF, and the struct offsets parsrv's programs read with it.

use std::{
    io::{self, Write as _},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

use btf_rs::{Backend, Btf, Type};
use parsrv_common::reuseport::KernelOffsets;

use crate::{
    error::{Error, Result},
    procfs,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
