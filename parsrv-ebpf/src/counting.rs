//! Per-CPU counters: each CPU has its own copy of a counter struct, which only the program
//! running on that CPU writes, so plain increments are exact; userspace sums the copies.

use aya_ebpf::maps::PerCpuArray;

/// Updates this CPU's element `index` of `map`; an index out of range counts nothing.
#[inline(always)]
pub fn count<T>(map: &PerCpuArray<T>, index: u32, update: impl FnOnce(&mut T)) {
    if let Some(counters) = map.get_ptr_mut(index) {
        // SAFETY: this CPU's element; the program is its only writer on this CPU, and
        // programs do not preempt each other on one CPU.
        update(unsafe { &mut *counters });
    }
}
