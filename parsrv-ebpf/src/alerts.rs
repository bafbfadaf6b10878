//! Queue alerts: the program tells userspace when a connection goes to a socket whose queue
//! is at least half full, so that the autoscaler can sleep while every queue stays below
//! half, and still see an overload start within a connection.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use parsrv_common::reuseport::{QueueAlert, ALERT_EVERY_NS, QUEUE_ALERTS_BYTES};

use crate::counting::due;

#[map]
static QUEUE_ALERTS: RingBuf = RingBuf::with_byte_size(QUEUE_ALERTS_BYTES, 0);

/// When this CPU last sent an alert (not pinned: private to the program).
#[map]
static LAST_ALERT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Sends an alert for `slot`, unless this CPU sent one less than ALERT_EVERY_NS ago. Not
/// inlined: only connections to a half-full queue call it.
#[inline(never)]
pub fn alert(slot: u32) {
    if !due(&LAST_ALERT, ALERT_EVERY_NS) {
        return;
    }
    // A full ring (a reader that does not read) loses the alert: nothing to do about it here.
    let _ = QUEUE_ALERTS.output::<QueueAlert>(QueueAlert { slot, _reserved: 0 }, 0);
}
