//! State that belongs to a network namespace rather than to one group, under
//! `/sys/fs/bpf/parsrv/_netns-INODE/` (INODE: the namespace's, from `/proc/thread-self/ns/net`).
//!
//! Today it is the namespace's guard: a spawner holds its lock while it claims an address
//! (checks that no stranger holds it, and binds) and names a group, so two spawners
//! started at once cannot both find an address free and join one reuseport group, nor both
//! take one group name. Programs and maps that serve a whole namespace (an sk_lookup
//! dispatcher, its address table) are to be pinned here, published by renaming a staging
//! directory into it while the lock is held.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use parsrv_common::scope::NETNS_PREFIX;

use crate::{
    error::{Error, Result},
    procfs,
};

/// The state directory of the calling thread's network namespace.
pub fn dir() -> Result<PathBuf> {
    let inode = procfs::thread_netns_inode()
        .map_err(Error::io(format!("reading {}", procfs::THREAD_NETNS)))?;
    Ok(super::pins::root().join(format!("{NETNS_PREFIX}{inode}")))
}

/// Exclusive hold of a namespace's state: released when dropped.
#[derive(Debug)]
pub struct NetnsLock {
    _lock: Flock<fs::File>,
    dir: PathBuf,
}

impl NetnsLock {
    /// Waits for, and takes, the lock of the calling thread's namespace, creating its
    /// directory if needed.
    pub fn acquire() -> Result<NetnsLock> {
        Self::acquire_at(&dir()?)
    }

    fn acquire_at(dir: &Path) -> Result<NetnsLock> {
        let context = || format!("locking the namespace state at {}", dir.display());
        loop {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(Error::io(context()))?;
            }
            // mkdir is atomic: of two spawners, one creates it and both then open the same one.
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(context())(e)),
            }
            let file = match fs::File::open(dir) {
                Ok(file) => file,
                // Removed by a spawner that released it empty: make it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(context())(e)),
            };
            check_root_owned(dir, &file)?;
            let lock = lock_within(file, dir, LOCK_DEADLINE)?;
            // The holder before us may have removed the directory: then our lock is on a
            // dead inode, and the next spawner would lock a new one. Lock what is there now.
            let current = fs::metadata(dir).map(|m| m.ino()).ok();
            let locked = lock.metadata().map(|m| m.ino()).ok();
            if current.is_some() && current == locked {
                return Ok(NetnsLock {
                    _lock: lock,
                    dir: dir.to_owned(),
                });
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// How long a spawner waits for another to finish starting a group in this namespace
/// (loading and verifying its programs: seconds under emulation) before it gives up,
/// naming the holder.
const LOCK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Takes the exclusive flock of `dir`'s open `file`, waiting at most `deadline`.
fn lock_within(
    file: fs::File,
    dir: &Path,
    deadline: std::time::Duration,
) -> Result<Flock<fs::File>> {
    let started = std::time::Instant::now();
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < deadline => {
                file = back;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::NamespaceLockHeld {
                    path: dir.to_owned(),
                    waited: deadline.as_secs(),
                    holder: holder_of(dir),
                })
            }
            Err((_, errno)) => {
                return Err(Error::io(format!(
                    "locking the namespace state at {}",
                    dir.display()
                ))(errno.into()))
            }
        }
    }
}

/// Who holds the flock on `dir`, from /proc/locks: "pid N (COMM, uid U)".
fn holder_of(dir: &Path) -> String {
    let Ok(inode) = fs::metadata(dir).map(|m| m.ino()) else {
        return "a process that could not be found".into();
    };
    procfs::flock_holder(inode).map_or_else(
        || "a process that could not be found".into(),
        |pid| {
            let comm = procfs::comm(pid).unwrap_or_default();
            let uid = procfs::process_uid(pid).map_or_else(|| "?".into(), |uid| uid.to_string());
            format!("pid {pid} ({comm}, uid {uid})")
        },
    )
}

/// Refuses a lock directory, or its parent, that another user owns or may write: whoever
/// controls it controls when parsrv may start a group.
/// Refuses the namespace's directory unless it and its parent are root's alone. The
/// directory is checked as opened (`opened`), not by its path: the spawner that held the
/// lock may remove it between our open and this check (its path then names nothing: a
/// spawner racing another for one address failed "reading _netns-...: No such file" in a
/// 6.12 VM), and the inode is what the lock is taken on.
fn check_root_owned(dir: &Path, opened: &fs::File) -> Result<()> {
    let reading = |path: &Path| Error::io(format!("reading {}", path.display()));
    let mut checks = Vec::with_capacity(2);
    if let Some(parent) = dir.parent() {
        checks.push((parent, fs::metadata(parent).map_err(reading(parent))?));
    }
    checks.push((dir, opened.metadata().map_err(reading(dir))?));
    for (path, meta) in checks {
        if let Some(why) = crate::kernel::untrusted_because(&meta) {
            return Err(Error::UntrustedPath {
                path: path.to_owned(),
                why,
            });
        }
    }
    Ok(())
}

impl Drop for NetnsLock {
    /// Leaves nothing behind: the directory goes when nothing is pinned in it (rmdir fails
    /// on a non-empty one, which is then kept). Still under the lock, so that no other
    /// spawner is using it.
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{Arc, Barrier},
        time::Duration,
    };

    #[test]
    fn one_holder_at_a_time_and_nothing_left_behind() {
        let root = std::env::temp_dir().join(format!("parsrv-netns-{}", std::process::id()));
        let dir = root.join("_netns-1");
        let first = NetnsLock::acquire_at(&dir).unwrap();
        assert!(dir.is_dir());
        let (taken, waiting) = std::sync::mpsc::channel();
        let start = Arc::new(Barrier::new(2));
        let contender = {
            let (dir, start) = (dir.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let lock = NetnsLock::acquire_at(&dir).unwrap();
                taken.send(()).unwrap();
                drop(lock);
            })
        };
        start.wait();
        // The contender cannot get it while the first holds it...
        assert!(waiting.recv_timeout(Duration::from_millis(200)).is_err());
        drop(first); // removes the empty directory while the contender waits on it
                     // ...and gets it (on a directory that exists) once released.
        waiting.recv_timeout(Duration::from_secs(10)).unwrap();
        contender.join().unwrap();
        assert!(!dir.exists(), "the last holder removes the empty directory");
        // A directory with something in it stays.
        let kept = NetnsLock::acquire_at(&dir).unwrap();
        fs::create_dir(dir.join("PINNED")).unwrap();
        drop(kept);
        assert!(dir.join("PINNED").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_the_callers_namespace() {
        let dir = dir().unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap();
        let inode: u64 = name.strip_prefix(NETNS_PREFIX).unwrap().parse().unwrap();
        assert_eq!(inode, fs::metadata("/proc/self/ns/net").unwrap().ino());
    }

    #[test]
    fn a_held_lock_is_waited_for_a_while_then_named_and_a_foreign_directory_refused() {
        let root = std::env::temp_dir().join(format!("parsrv-netns-held-{}", std::process::id()));
        let dir = root.join("_netns-2");
        let held = NetnsLock::acquire_at(&dir).unwrap();
        let file = fs::File::open(&dir).unwrap();
        let error = lock_within(file, &dir, Duration::from_millis(100)).unwrap_err();
        let said = error.to_string();
        assert!(
            said.contains(&format!("pid {} (", std::process::id())),
            "{said}"
        );
        assert!(matches!(error, Error::NamespaceLockHeld { waited: 0, .. }));
        drop(held);
        // A lock directory a local user made (and so could hold) is not trusted (chown
        // needs root: the part a user's `cargo test` cannot do).
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let refused = NetnsLock::acquire_at(&dir).unwrap_err();
        assert!(
            refused.to_string().contains("owned by uid 65534"),
            "{refused}"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
