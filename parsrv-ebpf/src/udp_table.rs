//! What the flow and quic programs share (`bin/udp_flow.rs`, `bin/udp_quic.rs`): a table of
//! where each entry (a flow, a QUIC first flight) was placed, and the two things done with
//! it: following a recorded entry, and recording a new one. Included by `#[path]`, as
//! `udp_room.rs`.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::SkReuseportContext,
};
use parsrv_common::udp::{FlowEntry, UdpFailOpen, UdpTableCounters};

use crate::{
    counting::count,
    udp_room::{apply, count_error, select, Choice, Outcome, NO_SLOT, UDP_SLOT_COUNTERS},
};

/// What was done to the table: `added` less the entries it holds is what the kernel evicted.
#[map]
static UDP_TABLE_COUNTERS: PerCpuArray<UdpTableCounters> = PerCpuArray::with_max_entries(1, 0);

/// Sends a recorded entry's datagram to its socket (counted as `flow_datagrams`): false if
/// the socket left the group (the slot is empty).
#[inline(always)]
pub fn follow(ctx: &SkReuseportContext, slot: u32) -> bool {
    if slot == NO_SLOT || select(ctx, slot).is_err() {
        return false;
    }
    count(&UDP_SLOT_COUNTERS, slot, |c| c.flow_datagrams += 1);
    true
}

/// Records `key` in `table` as placed by `choice` at `now` (counted as `flows`), and sends the
/// datagram where `choice` says; `replace`: the table holds an expired entry of `key`.
#[inline(always)]
pub fn record<K>(
    ctx: &SkReuseportContext,
    table: &LruHashMap<K, FlowEntry>,
    key: &K,
    choice: &Choice,
    now: u64,
    replace: bool,
) -> Result<(), UdpFailOpen> {
    if choice.outcome == Outcome::Unknown {
        // No slot to record: the kernel's hash places it (the error is counted).
        return Ok(());
    }
    let entry = FlowEntry {
        last_ns: now,
        slot: choice.slot,
        _pad: 0,
    };
    // A new entry only where none is recorded: when the first datagrams of a flow arrive on
    // two CPUs at once, the second to get here follows the first. An expired entry is
    // replaced (two CPUs replacing one at once may each send one datagram their own way).
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    if table.insert(key, entry, flags as u64).is_err() {
        if let Some(recorded) = table.get_ptr(key) {
            // SAFETY: a value of the table, copied out at once.
            if follow(ctx, unsafe { (*recorded).slot }) {
                return Ok(());
            }
        }
        count_error(UdpFailOpen::FlowUnrecorded);
        return apply(ctx, choice);
    }
    apply(ctx, choice)?;
    count(&UDP_SLOT_COUNTERS, choice.slot, |c| c.flows += 1);
    if !replace {
        // (An expired entry the table evicted between its lookup and this update is added
        // back uncounted: rare, and the count of evictions is short by one.)
        count(&UDP_TABLE_COUNTERS, 0, |c| c.added += 1);
    }
    Ok(())
}
