//! A listener's accept queue, read exactly from the kernel, and the listener with the most
//! room among a group's.
//!
//! `struct bpf_sock` has no backlog fields, so the program reads `struct sock` with
//! `bpf_probe_read_kernel`, at offsets userspace took from the running kernel's BTF. A
//! counter of selections minus accepts would drift (dropped SYNs are re-run, syncookies run
//! twice, abandoned handshakes never reach accept), so none is kept.

use aya_ebpf::{
    bindings::bpf_sock,
    cty::c_void,
    helpers::{
        bpf_probe_read_kernel,
        generated::{self, bpf_loop},
    },
    macros::map,
    maps::PerCpuArray,
    programs::SkReuseportContext,
};
use parsrv_common::reuseport::{
    FailOpen, KernelOffsets, LAST_RESORT_MARK, MAX_SOCKETS, NO_HANDLER_MARK, RESTARTING_MARK,
};

// scan_step masks indices with MAX_SOCKETS - 1.
const _: () = assert!(MAX_SOCKETS.is_power_of_two());

/// Per-CPU scratch: a word to turn `ctx->sk` into a number (see [`address_of`]), a copy of
/// the group's `socks[]` for the scan, and the scan's state.
#[repr(C)]
pub struct Scratch {
    member: u64,
    socks: [u64; MAX_SOCKETS as usize],
    scan: Scan,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// One listener as the program sees it: its kernel address and how full its queue is.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Listener {
    /// `struct sock *` as a plain number (see [`address_of`]), so offsets can be added.
    pub addr: u64,
    /// Its position in the kernel's `socks[]` now.
    pub index: u32,
    /// Connections the queue can still take without overflowing, counting handshakes in
    /// progress as taken: `max + 1 - established - pending`. The kernel calls a listener full
    /// when `sk_ack_backlog > sk_max_ack_backlog` (a listen(4) queue holds 5), and it checks
    /// that at SYN time, before the child exists; counting pending handshakes keeps
    /// concurrent SYNs from overshooting. Negative when overcommitted, and far below any
    /// other socket's when the slot has no ready handler ([`NO_HANDLER_MARK`]).
    pub room: i64,
    /// Free places by the kernel's own test alone (`max + 1 - established`), as a rank.
    /// Pending handshakes are left out: under a SYN flood they fill every SYN queue while
    /// the accept queues stay empty, and the kernel still serves clients (with syncookies).
    /// Sockets rank in tiers: with a handler and a free place (positive), then a
    /// restarting handler's (`RESTARTING_MARK`) with a free place (just above -2^41), then
    /// full ones (at most -2^42), then a never-ready handler's (below -2^43): when every
    /// socket with a handler is full, a connection waits in the queue of a handler being
    /// restarted rather than being dropped or refused.
    pub free: i64,
    /// The kernel itself would drop a SYN here now (`sk_acceptq_is_full`).
    pub kernel_full: bool,
    /// Its queue length (`sk_max_ack_backlog`), or a large negative number when it has no
    /// ready handler.
    pub limit: i64,
}

impl Listener {
    /// 1 if, with one more connection, its queue is at least half full (handshakes
    /// counted), else 0; always 0 for a socket without a handler. Computed with the sign
    /// bit, not a comparison: BPF has no conditional set, so a bool costs a branch, and a
    /// branch here doubles the paths the verifier walks through the whole program.
    #[inline(always)]
    pub fn half_full(&self) -> u32 {
        let taken_after = self.limit + 2 - self.room;
        // limit - 2 * taken_after < 0  <=>  2 * taken_after >= limit + 1.
        let half = ((self.limit - 2 * taken_after) as u64 >> 63) as u32;
        let has_handler = 1 - ((self.limit as u64) >> 63) as u32;
        half & has_handler
    }
}

#[inline(always)]
pub fn read<T>(addr: u64) -> Result<T, FailOpen> {
    // SAFETY: bpf_probe_read_kernel never faults; a bad address gives an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| FailOpen::ReadFailed)
}

/// `ctx->sk` as a plain number (see [`address_of_sock`]).
#[inline(always)]
pub fn address_of(ctx: &SkReuseportContext) -> Result<u64, FailOpen> {
    // SAFETY: reading a context field.
    address_of_sock(unsafe { (*ctx.md).__bindgen_anon_3.sk })
}

/// A socket pointer the verifier tracks (a context's `sk`, or one a map lookup returned) as
/// a plain number. The verifier forbids arithmetic on a socket pointer and refuses to reload
/// a spilled pointer as a number, but (with CAP_PERFMON) lets a pointer be stored in a map
/// value, and a map value reads back as a number. Unlike laundering it through
/// bpf_probe_read_kernel, this costs no helper call (the per-CPU lookup is inlined).
#[inline(always)]
pub fn address_of_sock(sk: *mut bpf_sock) -> Result<u64, FailOpen> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(FailOpen::ReadFailed)?;
    // SAFETY: this CPU's scratch word, written and read back volatile so the compiler keeps
    // the round trip through the map.
    unsafe {
        let word = core::ptr::addr_of_mut!((*scratch).member);
        core::ptr::write_volatile(word as *mut *mut bpf_sock, sk);
        Ok(core::ptr::read_volatile(word))
    }
}

#[inline(always)]
pub fn listener(addr: u64, index: u32, off: &KernelOffsets) -> Result<Listener, FailOpen> {
    // sk_max_ack_backlog follows sk_ack_backlog (the loader checks): one read for both.
    let [established, max]: [u32; 2] = read(addr + off.sk_ack_backlog as u64)?;
    let pending: u32 = read(addr + off.accept_queue_qlen as u64)?;
    let incoming_cpu: i32 = read(addr + off.skc_incoming_cpu as u64)?;
    let free_places = max as i64 + 1 - established as i64;
    // No ready handler: its room ranks below every socket that has one, whatever their
    // queues (u32 counts cannot reach 2^40), and is never positive. Its queue length is left
    // as it was, so that what the kernel admits does not change: a handshake in flight
    // still completes into its queue, for the next handler. Its free places (see
    // `Listener::free`) rank below every socket with a handler and a free place; a
    // restarting handler's socket above a full one, so that the connection waits for the
    // handler being started instead of being dropped; a never-ready handler's socket below
    // that too (its handler may never be ready).
    //
    // One comparison for both marks, not two: each branch here is walked by the verifier on
    // every path of the program (a second one cost 38% more instructions processed).
    const _: () = assert!(NO_HANDLER_MARK | 2 == -2 && RESTARTING_MARK | 2 == -2);
    const _: () = assert!(LAST_RESORT_MARK | 2 != -2);
    const _: () = assert!(NO_HANDLER_MARK - RESTARTING_MARK == 2);
    // 2^41 restarting, 2^43 never ready.
    let never_ready = (incoming_cpu - RESTARTING_MARK) as u64 & 2;
    let (limit, waiting) = if incoming_cpu | 2 == -2 {
        (-(1 << 40), (1i64 << 41) << never_ready)
    } else {
        (max as i64, 0)
    };
    // A full socket ranks below every socket with a free place, with a handler or not.
    // The sign bit, not a branch: see `half_full`.
    let full = (((free_places - 1) as u64) >> 63) << 42;
    let free = free_places - waiting - full as i64;
    // A spare or a stalled handler's socket: its room is ranked below every unmarked
    // socket's, its free places by the kernel's test stay real, so it is chosen when every
    // unmarked socket is full (`decide` then takes the most free one).
    let last_resort = if incoming_cpu == LAST_RESORT_MARK {
        1 << 40
    } else {
        0
    };
    Ok(Listener {
        addr,
        index,
        room: limit + 1 - established as i64 - pending as i64 - last_resort,
        free,
        kernel_full: established > max,
        limit,
    })
}

/// The scan's state, in this CPU's [`Scratch`] (never on the caller's stack, see
/// [`most_room`]): what it reads, set before the loop, and what it found so far.
#[repr(C)]
struct Scan {
    num: u64,
    first: u64,
    off: KernelOffsets,
    best: Listener,
    most_free: Listener,
    failed: u64,
}

/// What a scan found: the socket with the most room, and the one with the most room by the
/// kernel's own test.
pub struct Found {
    pub best: Listener,
    pub most_free: Listener,
}

/// The socket with the most room, and the one with the most room by the kernel's test
/// alone. The scan starts at the hash choice `first` so that ties
/// go to it (and after it, in group order): under even load this keeps the kernel's spread
/// instead of piling onto socket 0.
///
/// The walk runs under bpf_loop: the verifier checks [`scan_step`] on its own, whereas a
/// plain loop of up to MAX_SOCKETS iterations is verified iteration by iteration. The scan's
/// running state lives in the per-CPU [`Scratch`] map value and the callback gets no context:
/// since Linux 6.7 the verifier re-verifies a callback until the caller's state repeats, and
/// best-so-far values kept on the caller's stack got a new range on every pass, so it never
/// repeated and the program crossed the one-million-instruction budget (parsrv-ebpf's
/// crate docs, "Verification cost"). A map value's contents are not tracked, so the state
/// repeats at once.
#[inline(always)]
pub fn most_room(
    socks: u64,
    num: u32,
    first: u32,
    first_listener: Listener,
    off: &KernelOffsets,
) -> Result<Found, FailOpen> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(FailOpen::ReadFailed)?;
    // SAFETY: this CPU's scratch element; num <= MAX_SOCKETS was checked by the caller.
    let copy = unsafe { core::ptr::addr_of_mut!((*scratch).socks) };
    // The caller checked num <= MAX_SOCKETS, so LLVM drops a bound written here; but Linux
    // 6.1's verifier loses the caller's check when the value goes through the stack, and
    // refuses the copy's length. A volatile read keeps a check LLVM cannot drop.
    // SAFETY: a read of a local.
    let num = unsafe { core::ptr::read_volatile(&num) };
    if num == 0 || num > MAX_SOCKETS {
        return Err(FailOpen::BadGroup);
    }
    let len = num * 8;
    // One read for every socket pointer instead of one per socket.
    // SAFETY: copies at most size_of_val(copy) bytes into it.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(copy as *mut c_void, len, socks as *const c_void)
    };
    if rc != 0 {
        return Err(FailOpen::ReadFailed);
    }
    // SAFETY: this CPU's scratch element; nothing else runs on this CPU until the program
    // returns.
    unsafe {
        (*scratch).scan = Scan {
            num: num as u64,
            first: first as u64,
            off: *off,
            best: first_listener,
            most_free: first_listener,
            failed: 0,
        };
        // scan_step has the callback signature bpf_loop expects and finds its state itself.
        bpf_loop(num - 1, scan_step as *mut c_void, core::ptr::null_mut(), 0);
        let scan = &(*scratch).scan;
        if scan.failed != 0 {
            return Err(FailOpen::ReadFailed);
        }
        Ok(Found {
            best: scan.best,
            most_free: scan.most_free,
        })
    }
}

/// One step of [`most_room`]: looks at the `step`-th socket after the hash choice. 0 to go
/// on, 1 to stop.
#[inline(never)]
extern "C" fn scan_step(step: u64, _unused: *mut c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch element, which most_room filled before the loop.
    let scratch = unsafe { &mut *scratch };
    let scan = &mut scratch.scan;
    let mut index = scan.first + 1 + step;
    if index >= scan.num {
        index -= scan.num;
    }
    // The mask keeps the index in bounds for the verifier (index < num <= MAX_SOCKETS).
    let addr = scratch.socks[(index & (MAX_SOCKETS as u64 - 1)) as usize];
    match listener(addr, index as u32, &scan.off) {
        Ok(candidate) => {
            if candidate.room > scan.best.room {
                scan.best = candidate;
            }
            if candidate.free > scan.most_free.free {
                scan.most_free = candidate;
            }
            0
        }
        Err(_) => {
            scan.failed = 1;
            1
        }
    }
}
