//! Counters a built-in handler shares with its spawner: a memory page (a memfd mapped by
//! both), passed to the handler as fd 4.
//!
//! The page is sealed at its size (F_SEAL_SHRINK, F_SEAL_GROW, then F_SEAL_SEAL): a
//! process that truncated a shared mapping's file would make the root spawner's next read
//! of it die of SIGBUS, and a handler's code, or any process of its user, holds fd 4. A
//! page without these seals is refused when mapped (adoption maps whatever fd 4 is).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::AtomicU64,
};

use memmap2::MmapMut;

/// Counters a built-in handler keeps in memory shared with the spawner.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// accept() calls that found the queue already emptied by another thread (EAGAIN).
    pub lost_races: AtomicU64,
    /// Connections being served now (by every process of the slot).
    pub active: AtomicU64,
    /// The pid of the last handler process of the slot that started accepting: the spawner
    /// takes a replacement as ready once it shows here.
    pub ready: AtomicU64,
}

/// What keeps the page at its size, for good.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A [`HandlerStats`] in a memfd: the spawner creates it once per slot (so counts survive
/// handler restarts) and maps it; the handler maps the same page.
pub struct SharedStats {
    map: MmapMut,
    fd: OwnedFd,
}

impl SharedStats {
    pub fn create(slot: u32) -> io::Result<Self> {
        let name = std::ffi::CString::new(format!("parsrv-handler-{slot}")).unwrap();
        // SAFETY: valid name; the returned fd is owned below.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd from memfd_create.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = std::fs::File::from(fd);
        file.set_len(size_of::<HandlerStats>() as u64)?;
        // SAFETY: fcntl with integer arguments on our own fd.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file.into())
    }

    /// Maps a page created by [`SharedStats::create`] (in another process), if it is
    /// sealed at its size.
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: fcntl with integer arguments on an fd we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(io::Error::other(
                "the handler stats page is not sealed at its size (not one parsrv created)",
            ));
        }
        let file = std::fs::File::from(fd);
        // SAFETY: a memfd only parsrv's spawner and handler map; all access is atomic.
        let map = unsafe { MmapMut::map_mut(&file)? };
        if map.len() < size_of::<HandlerStats>() {
            return Err(io::Error::other("handler stats page too small"));
        }
        Ok(SharedStats {
            map,
            fd: file.into(),
        })
    }

    pub fn stats(&self) -> &HandlerStats {
        // SAFETY: page-aligned mapping of at least size_of::<HandlerStats>() bytes; all
        // fields are atomics, valid for any bit pattern (zero-filled at creation).
        unsafe { &*self.map.as_ptr().cast::<HandlerStats>() }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn shared_stats_are_shared() {
        let ours = SharedStats::create(0).unwrap();
        let theirs = SharedStats::map(ours.fd().try_clone().unwrap()).unwrap();
        theirs.stats().accepted.fetch_add(3, Ordering::Relaxed);
        assert_eq!(ours.stats().accepted.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_page_cannot_be_truncated_and_an_unsealed_one_is_refused() {
        let ours = SharedStats::create(0).unwrap();
        let file = std::fs::File::from(ours.fd().try_clone().unwrap());
        let shrink = file.set_len(0).unwrap_err();
        assert_eq!(shrink.raw_os_error(), Some(libc::EPERM));
        let grow = file.set_len(1 << 20).unwrap_err();
        assert_eq!(grow.raw_os_error(), Some(libc::EPERM));
        // Control: a memfd without the seals truncates, and is not taken for a page.
        let name = std::ffi::CString::new("control").unwrap();
        // SAFETY: valid name; the fd is owned at once.
        let plain =
            unsafe { OwnedFd::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC)) };
        let plain = std::fs::File::from(plain);
        plain.set_len(4096).unwrap();
        plain.set_len(0).unwrap();
        plain.set_len(4096).unwrap();
        assert!(SharedStats::map(plain.into()).is_err());
    }
}
