//! Queue alerts from the SK_REUSEPORT program (eBPF side: `parsrv-ebpf/src/alerts.rs`): a
//! ring buffer the program writes when a connection goes to a socket whose queue is at least
//! half full. The autoscaler sleeps on it while every queue stays below half, instead of
//! sampling a group that has nothing to show.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// The QUEUE_ALERTS ring, readable from the spawner's event loop.
pub struct QueueAlerts {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl QueueAlerts {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring owns its fd, which stays open (and the same) until the AsyncFd
        // drops it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(QueueAlerts { ring })
    }

    /// Drops every alert sent so far (while the reader was awake, alerts tell it nothing).
    pub fn discard(&mut self) -> usize {
        drain(self.ring.get_mut())
    }

    /// Waits for the next alert. The kernel wakes a ring's reader when a record arrives
    /// with nothing unread before it, so the ring is emptied before each wait.
    pub async fn next(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.ring.readable_mut().await?;
            let read = drain(ready.get_inner_mut());
            ready.clear_ready();
            if read > 0 {
                return Ok(());
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>) -> usize {
    let mut read = 0;
    while ring.next().is_some() {
        read += 1;
    }
    read
}
