//! Per-CPU counters: each CPU has its own copy of a counter struct, which only the program
//! running on that CPU writes, so plain increments are exact; userspace sums the copies.
//! And per-CPU rate limits, kept the same way.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray};

/// Updates this CPU's element `index` of `map`; an index out of range counts nothing.
#[inline(always)]
pub fn count<T>(map: &PerCpuArray<T>, index: u32, update: impl FnOnce(&mut T)) {
    if let Some(counters) = map.get_ptr_mut(index) {
        // SAFETY: this CPU's element; the program is its only writer on this CPU, and
        // programs do not preempt each other on one CPU.
        update(unsafe { &mut *counters });
    }
}

/// Whether this CPU may do something it does at most once per `every_ns`: true (and the
/// time noted in `last`, element 0) if it last did it at least that long ago, or never.
#[inline(always)]
pub fn due(last: &PerCpuArray<u64>, every_ns: u64) -> bool {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = last.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's element; nothing else runs on this CPU meanwhile.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < every_ns {
        return false;
    }
    *last = now;
    true
}
