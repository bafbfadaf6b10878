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

use crate::error::{Error, Result};

/// The namespace the calling thread is in.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// The state directory of the calling thread's network namespace.
pub fn dir() -> Result<PathBuf> {
    let inode = fs::metadata(OWN_NETNS)
        .map_err(Error::io(format!("reading {OWN_NETNS}")))?
        .ino();
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
            let lock = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, errno)| Error::io(context())(errno.into()))?;
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
}
