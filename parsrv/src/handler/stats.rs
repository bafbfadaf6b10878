//! Counters a built-in handler shares with its spawner: a memory page (a memfd mapped by
//! both), passed to the handler as fd 4.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
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
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd from memfd_create.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = std::fs::File::from(fd);
        file.set_len(size_of::<HandlerStats>() as u64)?;
        Self::map(file.into())
    }

    /// Maps a page created by [`SharedStats::create`] (in another process).
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
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
}
