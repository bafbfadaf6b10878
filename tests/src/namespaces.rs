//! Namespaces of a test's own ([`isolated`]): loopback only, a fresh bpffs and an empty
//! /run, as on a machine that has just booted.

use std::{
    io::{self},
    os::fd::AsRawFd,
    thread,
};

use crate::*;

/// Set (to 1) by `cargo xtask test` and the VMs' init, which start the suite in the state
/// of a machine that has just booted (no bpffs at /sys/fs/bpf, an empty /run): the tests
/// then check that they did.
pub const FRESH_MACHINE_ENV: &str = "PARSRV_TEST_FRESH_MACHINE";

/// Runs `test` on a thread of its own, in namespaces of its own, as on a machine that has
/// just booted with parsrv's needs met:
/// - a network namespace with only loopback, up;
/// - a mount namespace (propagation private: nothing leaks back to the host) in which
///   /sys/fs/bpf is a new bpffs instance of its own (holding only what the kernel puts in
///   every new one), whatever was mounted there before is detached, and /run is an empty
///   tmpfs, so the run directory (control sockets) does not exist yet.
///
/// Threads and processes the test starts inherit both namespaces; when the last of them
/// ends, the bpffs instance and its pins go with it. A test that wants bpffs unmounted
/// calls [`unmount_bpffs`] first.
pub fn isolated<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
    // Named after the test, which a skip or a figure recorded inside names.
    let name = thread::current().name().unwrap_or("?").to_owned();
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            use nix::sched::CloneFlags;
            // A thread may take namespaces of its own: unshare(CLONE_NEWNS) implies CLONE_FS,
            // which gives this thread (and what it starts) its own root, cwd and mounts.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect(
                "unshare(CLONE_NEWNET | CLONE_NEWNS): the integration tests must run as root",
            );
            loopback_up().expect("bringing up lo in the test's namespace");
            fresh_mounts().expect("mounting a fresh bpffs and /run in the test's namespace");
            test()
        })
        .expect("starting the test's thread")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Where parsrv looks for bpffs (and so where each test mounts its own).
pub const BPFFS: &str = parsrv::kernel::BPFFS;

/// In the calling thread's (new) mount namespace: private propagation, a fresh bpffs, an
/// empty /run.
fn fresh_mounts() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    unmount_bpffs();
    mount_bpffs()?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
}

/// Detaches every bpffs mounted at /sys/fs/bpf in the calling thread's mount namespace (it
/// can be mounted more than once on the same path): parsrv then finds none, as on a machine
/// that has just booted. Only inside [`isolated`].
pub fn unmount_bpffs() {
    while nix::mount::umount2(BPFFS, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}

/// Mounts a new, empty bpffs instance at /sys/fs/bpf. Only inside [`isolated`].
pub fn mount_bpffs() -> nix::Result<()> {
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
}

/// Whether /sys/fs/bpf, as the calling thread sees it, is a bpffs. Written apart from
/// parsrv's own check (`kernel::ensure_bpffs`), which the tests judge.
pub fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs(BPFFS)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn loopback_up() -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; the ioctls read and write only it.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
