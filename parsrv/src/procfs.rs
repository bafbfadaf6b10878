//! Everything parsrv reads from /proc, and the parsers of the kernel's formats there: the
//! only module that names a /proc path, so that each file's subtleties are handled once.
//! What another user's process can make large is read up to a bound or a line at a time;
//! the rest is small by the kernel's own format.
//!
//! `/proc/self/exe` stays with the code that runs it (the spawner starting a handler, and
//! re-executing itself on `parsrv upgrade` when its own path is unknown): it is a program
//! to exec, not a file read.

use std::{
    fs::{self, File},
    io::{self, BufRead, BufReader, Read},
    net::IpAddr,
    os::{fd::RawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// The most read of another process's command line or environment: what exec accepts for
/// both together under the default 8 MiB stack limit (a quarter of it, `getconf ARG_MAX`),
/// so that whatever parsrv starts is read whole. A process can make them far larger
/// (prctl PR_SET_MM_MAP, which any user may call in a user namespace of its own), and a
/// record may name any pid.
const MAX_ARGUMENTS: u64 = 2 << 20;

/// The most read of another process's status: its ids come in the first lines, and the
/// lines after them (supplementary groups) are as long as it has groups.
const MAX_STATUS: u64 = 64 << 10;

/// The kernel's sysctls, one file each (`kernel/cap_last_cap`, `net/ipv4/...`).
pub fn sysctls() -> &'static Path {
    Path::new("/proc/sys")
}

/// The value of sysctl `name` (its path under /proc/sys, `kernel/bpf_stats_enabled`),
/// without the newline the kernel ends it with.
pub fn sysctl(name: &str) -> io::Result<String> {
    sysctl_in(sysctls(), name)
}

/// [`sysctl`] under `root` rather than /proc/sys.
pub fn sysctl_in(root: &Path, name: &str) -> io::Result<String> {
    Ok(fs::read_to_string(root.join(name))?.trim().to_owned())
}

/// Whether the kernel has sysctl `name` under `root` (/proc/sys, or a copy), readable or not.
pub fn has_sysctl_in(root: &Path, name: &str) -> bool {
    root.join(name).exists()
}

/// The highest capability number the running kernel knows (kernel/cap_last_cap).
pub fn last_capability() -> io::Result<u32> {
    last_capability_in(sysctls())
}

/// [`last_capability`] from the sysctls under `root`.
pub fn last_capability_in(root: &Path) -> io::Result<u32> {
    sysctl_in(root, "kernel/cap_last_cap")?
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// This process's effective capabilities, a bit per capability number (the `CapEff:` line
/// of /proc/self/status, in hex).
pub fn effective_capabilities() -> io::Result<u64> {
    effective_capabilities_in(&fs::read_to_string("/proc/self/status")?)
}

fn effective_capabilities_in(status: &str) -> io::Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

/// The numbers of the running processes (the numeric entries of /proc), as the directory
/// lists them; none if /proc cannot be read. A process may exit while the caller looks at it.
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// Field `number` (as proc(5) numbers them, from 1) of /proc/PID/stat, from the state (3)
/// on, or None if the process is gone. The command name (2) may hold spaces and
/// parentheses: the fields after it start after the last ')'.
fn stat_field(pid: u32, number: usize) -> Option<String> {
    stat_field_in(
        &fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
        number,
    )
}

fn stat_field_in(stat: &str, number: usize) -> Option<String> {
    const STATE: usize = 3;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(number.checked_sub(STATE)?)
        .map(str::to_owned)
}

/// A process's state letter from /proc/PID/stat (R, S, D, T, t, Z, X, ...), or None if it
/// is gone.
pub fn process_state(pid: u32) -> Option<char> {
    stat_field(pid, 3)?.chars().next()
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
pub fn process_group(pid: u32) -> Option<u32> {
    stat_field(pid, 5)?.parse().ok()
}

/// When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat): with the pid,
/// the identity of a process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// The command name of `pid` (/proc/PID/comm: at most 15 bytes, which the process sets as it
/// likes), trimmed of the kernel's newline and of spaces at either end; None if the process
/// is gone or the name is not UTF-8.
pub fn comm(pid: u32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// The kernel function `pid` sleeps in (/proc/PID/wchan; `0` when it runs), if it exists.
pub fn wchan(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/wchan")).ok()
}

/// Whether a thread of `pid`, or of one of its children, is runnable or running (state R
/// in /proc/PID/task/TID/stat). Bounded: at most 4096 threads of each.
pub fn any_thread_runnable(pid: u32) -> bool {
    let runnable = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| {
                dir.flatten().take(4096).any(|task| {
                    fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the command name's closing parenthesis.
                        stat.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with('R'))
                    })
                })
            })
            .unwrap_or(false)
    };
    let children: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .take(4096)
                .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
                .flat_map(|list| {
                    list.split_whitespace()
                        .filter_map(|c| c.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .take(4096)
                .collect()
        })
        .unwrap_or_default();
    runnable(pid) || children.into_iter().any(runnable)
}

/// How long the threads of `pid` and of its children (a server's workers) have waited for
/// a CPU while runnable, in nanoseconds, summed (`/proc/PID/task/TID/schedstat`, second
/// field). Bounded: at most 4096 threads of each. 0 where schedstats are not kept.
pub fn run_delay_ns(pid: u32) -> u64 {
    let tasks = |pid: u32| -> Vec<PathBuf> {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| dir.flatten().take(4096).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let delay = |task: &PathBuf| -> u64 {
        fs::read_to_string(task.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let own = tasks(pid);
    let children: Vec<u32> = own
        .iter()
        .filter_map(|task| fs::read_to_string(task.join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .take(4096)
        .collect();
    own.iter().map(delay).sum::<u64>()
        + children
            .into_iter()
            .map(|child| tasks(child).iter().map(delay).sum::<u64>())
            .sum::<u64>()
}

/// The uid that owns /proc/PID: the process's effective uid (root's while it is not
/// dumpable, as after a set-uid exec).
pub fn process_uid(pid: u32) -> Option<u32> {
    fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()).ok()
}

/// A process's user and group ids, each as its status lists them: real, effective, saved,
/// file-system.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessIds {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// The ids of `pid` (the `Uid:` and `Gid:` lines of /proc/PID/status, read up to
/// [`MAX_STATUS`]), or None if the process is gone. The status shows the process's name,
/// which its owner sets (`PR_SET_NAME`) and which need not be UTF-8: read lossily, so that a
/// handler cannot hide a process of its uid (and make the uid look free) by naming it so.
pub fn process_ids(pid: u32) -> Option<ProcessIds> {
    let status = read_at_most(&format!("/proc/{pid}/status"), MAX_STATUS).ok()?;
    Some(process_ids_in(&String::from_utf8_lossy(&status)))
}

fn process_ids_in(status: &str) -> ProcessIds {
    let ids = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .map_or_else(Vec::new, |ids| {
                ids.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
    };
    ProcessIds {
        uids: ids("Uid:"),
        gids: ids("Gid:"),
    }
}

/// The arguments `pid` shows (/proc/PID/cmdline, split at its NULs, read up to
/// [`MAX_ARGUMENTS`]: the last one may be cut); none if it is gone. A process may rewrite
/// them: they say what it wants said.
pub fn cmdline(pid: u32) -> Vec<Vec<u8>> {
    nul_separated(read_at_most(&format!("/proc/{pid}/cmdline"), MAX_ARGUMENTS).unwrap_or_default())
}

/// The environment `pid` was started with, `NAME=value` each (/proc/PID/environ, split at
/// its NULs, read up to [`MAX_ARGUMENTS`]: the last one may be cut); none if it is gone or
/// not the caller's to read.
pub fn environ(pid: u32) -> Vec<Vec<u8>> {
    nul_separated(read_at_most(&format!("/proc/{pid}/environ"), MAX_ARGUMENTS).unwrap_or_default())
}

/// The pieces of a NUL-separated file; its last NUL ends the last piece, it starts none.
fn nul_separated(bytes: Vec<u8>) -> Vec<Vec<u8>> {
    let mut pieces: Vec<Vec<u8>> = bytes.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    if pieces.last().is_some_and(Vec::is_empty) {
        pieces.pop();
    }
    pieces
}

/// The fd numbers `pid` has open (the entries of /proc/PID/fd); none if it is gone or not
/// the caller's to look at.
pub fn fd_numbers(pid: u32) -> impl Iterator<Item = RawFd> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The fds `pid` has open and what each links to (/proc/PID/fd/N: a path, or
/// `socket:[INODE]`, `pipe:[INODE]`, `anon_inode:...`); an fd closed meanwhile is left out.
pub fn fds(pid: u32) -> impl Iterator<Item = (RawFd, PathBuf)> {
    fd_numbers(pid)
        .filter_map(move |fd| Some((fd, fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?)))
}

/// A path that opens this process's own `fd` again (for a library that takes only paths).
pub fn own_fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// The socket inode an fd's link names (`socket:[INODE]`), if it names a socket.
pub fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The sockets among `pid`'s fds, as (fd, socket inode).
pub fn socket_fds(pid: u32) -> impl Iterator<Item = (RawFd, u64)> {
    fds(pid).filter_map(|(fd, link)| Some((fd, socket_inode(&link)?)))
}

/// A process holding socket `inode` among its fds (/proc/*/fd); None if none is found
/// (another namespace's process, or it closed).
pub fn socket_holder(inode: u64) -> Option<u32> {
    pids().find(|&pid| socket_fds(pid).any(|(_, held)| held == inode))
}

/// The process holding a flock on the file with `inode` (/proc/locks, read a line at a time:
/// every process's locks are there).
pub fn flock_holder(inode: u64) -> Option<u32> {
    flock_holder_in(BufReader::new(File::open("/proc/locks").ok()?), inode)
}

fn flock_holder_in(locks: impl BufRead, inode: u64) -> Option<u32> {
    locks
        .lines()
        .map_while(Result::ok)
        .filter(|line| line.contains("FLOCK"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
            let position = fields.iter().position(|f| *f == "FLOCK")?;
            let pid: u32 = fields.get(position + 3)?.parse().ok()?;
            let file_inode: u64 = fields.get(position + 4)?.rsplit(':').next()?.parse().ok()?;
            (file_inode == inode).then_some(pid)
        })
}

/// The network namespace of the calling thread (a thread may have left the process's).
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// The inode of [`THREAD_NETNS`]: the namespace's identity.
pub fn thread_netns_inode() -> io::Result<u64> {
    Ok(fs::metadata(THREAD_NETNS)?.ino())
}

/// This process's network namespace (its main thread's, /proc/self/ns/net), open.
pub fn own_netns() -> io::Result<File> {
    File::open("/proc/self/ns/net")
}

/// The hardware addresses the kernel's neighbour table (ARP, /proc/thread-self/net/arp: the
/// calling thread's namespace, read a line at a time) has for `addr` in complete entries,
/// one per interface, as the kernel writes them (`02:00:c6:33:64:02`).
pub fn neighbour_addresses(addr: IpAddr) -> Vec<String> {
    File::open("/proc/thread-self/net/arp")
        .map(|table| neighbour_addresses_in(BufReader::new(table), addr))
        .unwrap_or_default()
}

fn neighbour_addresses_in(table: impl BufRead, addr: IpAddr) -> Vec<String> {
    const COMPLETE: u32 = 0x2; // ATF_COM
    table
        .lines()
        .map_while(Result::ok)
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (ip, flags, mac) = (fields.first()?, fields.get(2)?, fields.get(3)?);
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            (ip.parse::<IpAddr>().ok()? == addr && flags & COMPLETE != 0).then(|| mac.to_string())
        })
        .collect()
}

/// At most `limit` bytes of `path`, read before they are buffered.
fn read_at_most(path: &str, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_split_after_the_last_parenthesis_of_the_command_name() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777";
        assert_eq!(stat_field_in(stat, 3).as_deref(), Some("S"));
        assert_eq!(stat_field_in(stat, 5).as_deref(), Some("4242"));
        assert_eq!(stat_field_in(stat, 22).as_deref(), Some("777"));
        assert_eq!(
            stat_field_in(stat, 2),
            None,
            "the command name is not a field here"
        );
        assert_eq!(stat_field_in(stat, 23), None);
        assert_eq!(stat_field_in("4242 no parenthesis", 3), None);
    }

    #[test]
    fn stat_fields_are_numbered_as_proc_5_numbers_them() {
        let own = std::process::id();
        // The main thread: running, or waiting for the test threads.
        assert!(
            matches!(process_state(own), Some('R' | 'S')),
            "{:?}",
            process_state(own)
        );
        // SAFETY: a plain syscall.
        let group = unsafe { libc::getpgrp() } as u32;
        assert_eq!(stat_field(own, 5), Some(group.to_string()));
        assert_eq!(process_group(own), Some(group));
        assert!(stat_field(own, 22).unwrap().parse::<u64>().unwrap() > 0);
        assert_eq!(
            stat_field(own, 2),
            None,
            "the command name is not a field here"
        );
        assert_eq!(stat_field(u32::MAX, 3), None);
    }

    #[test]
    fn start_time_is_stable_and_names_the_process() {
        let own = process_start_time(std::process::id()).unwrap();
        assert_eq!(process_start_time(std::process::id()), Some(own));
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let theirs = process_start_time(child.id()).unwrap();
        assert!(theirs >= own);
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(process_start_time(child.id()), None);
    }

    #[test]
    fn status_gives_capabilities_and_ids() {
        let status = "Name:\ta) b (c\nUid:\t1000\t1001\t1002\t1003\nGid:\t100\t100\t100\t100\n\
                      Groups:\t100 27\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities_in(status).unwrap(), 0x1ff_ffff_ffff);
        assert!(effective_capabilities_in("Name:\tx\n").is_err());
        assert_eq!(
            process_ids_in(status),
            ProcessIds {
                uids: vec![1000, 1001, 1002, 1003],
                gids: vec![100; 4],
            }
        );
        assert_eq!(process_ids_in("Name:\tx\n"), ProcessIds::default());
    }

    #[test]
    fn a_process_named_in_bytes_that_are_not_utf8_still_shows_its_ids() {
        // A thread's status, as a process's: its name is the thread's own.
        let (uids, tid) = std::thread::spawn(|| {
            let name = [0xffu8, 0xfe, b'x', 0];
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            let tid = nix::unistd::gettid().as_raw() as u32;
            (process_ids(tid).map(|ids| ids.uids), tid)
        })
        .join()
        .unwrap();
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(uids, Some(vec![uid; 4]), "thread {tid}");
    }

    #[test]
    fn reads_its_own_status_comm_and_fds() {
        let own = std::process::id();
        effective_capabilities().unwrap();
        let ids = process_ids(own).unwrap();
        assert!(
            ids.uids.contains(&nix::unistd::getuid().as_raw()),
            "{ids:?}"
        );
        assert!(
            ids.gids.contains(&nix::unistd::getgid().as_raw()),
            "{ids:?}"
        );
        assert_eq!(process_uid(own), Some(nix::unistd::geteuid().as_raw()));
        // The main thread's name: the test binary's file name, cut to 15 bytes.
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert_eq!(comm(own).unwrap(), name[..name.len().min(15)]);
        assert_eq!(comm(u32::MAX), None);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let fd = listener.as_raw_fd();
        let inode = crate::kernel::socket_inode(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        assert!(fd_numbers(own).any(|n| n == fd));
        assert!(socket_fds(own).any(|found| found == (fd, inode)));
        assert_eq!(socket_holder(inode), Some(own));
        assert!(pids().any(|pid| pid == own));
        assert_eq!(fds(u32::MAX).count(), 0);
    }

    #[test]
    fn fd_links_name_sockets_by_inode() {
        assert_eq!(socket_inode(Path::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(Path::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(Path::new("/tmp/socket:[1]")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
    }

    #[test]
    fn nul_separated_files_split_into_their_pieces() {
        let pieces = nul_separated(b"parsrv\0handler\0--slot=1\0".to_vec());
        assert_eq!(pieces, [&b"parsrv"[..], b"handler", b"--slot=1"]);
        assert_eq!(nul_separated(b"a\0\0b".to_vec()), [&b"a"[..], b"", b"b"]);
        assert!(nul_separated(Vec::new()).is_empty());
        let own = std::process::id();
        let args = cmdline(own);
        let first = std::env::args_os().next().unwrap();
        assert_eq!(args[0], first.as_encoded_bytes());
        assert!(cmdline(u32::MAX).is_empty());
        let environment = environ(own);
        assert_eq!(environment.is_empty(), std::env::vars_os().next().is_none());
        assert!(environment.iter().all(|v| v.contains(&b'=')));
    }

    #[test]
    fn a_flock_is_found_by_its_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:2a:1111 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 4321 fd:01:9999 0 EOF\n";
        assert_eq!(flock_holder_in(locks.as_bytes(), 5678), Some(1234));
        assert_eq!(flock_holder_in(locks.as_bytes(), 9999), Some(4321));
        assert_eq!(flock_holder_in(locks.as_bytes(), 1111), None, "not a flock");
        assert_eq!(flock_holder_in(locks.as_bytes(), 1), None);
    }

    #[test]
    fn the_neighbour_table_is_read_as_the_kernel_writes_it() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     198.51.100.2     0x1         0x2         02:00:c6:33:64:02     *        eth0\n\
                     198.51.100.3     0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let at = |ip: &str| neighbour_addresses_in(table.as_bytes(), ip.parse().unwrap());
        assert_eq!(at("198.51.100.2"), ["02:00:c6:33:64:02"]);
        assert!(at("198.51.100.3").is_empty(), "incomplete");
        assert!(at("198.51.100.4").is_empty());
    }

    #[test]
    fn sysctls_are_read_trimmed() {
        let root = std::env::temp_dir().join(format!("parsrv-procfs-{}", std::process::id()));
        fs::create_dir_all(root.join("kernel")).unwrap();
        fs::write(root.join("kernel/cap_last_cap"), "40\n").unwrap();
        assert_eq!(sysctl_in(&root, "kernel/cap_last_cap").unwrap(), "40");
        assert_eq!(last_capability_in(&root).unwrap(), 40);
        assert!(has_sysctl_in(&root, "kernel/cap_last_cap"));
        assert!(!has_sysctl_in(&root, "kernel/other"));
        fs::write(root.join("kernel/cap_last_cap"), "many\n").unwrap();
        assert!(last_capability_in(&root).is_err());
        fs::remove_dir_all(&root).unwrap();
        assert!(last_capability().unwrap() >= 30);
    }
}
