//! parsrv's SK_REUSEPORT program: for every new connection (and every connection migrating off
//! a closing listener) pick a listener of the group whose accept queue has room.
//!
//! The queue depth is the kernel's own, read on each run: `struct bpf_sock` has no backlog
//! fields, so the program walks the group (`ctx->sk->sk_reuseport_cb->socks[]`) with
//! `bpf_probe_read_kernel`, at offsets userspace took from the running kernel's BTF
//! (CONFIG). A counter of selections minus accepts would drift (dropped SYNs are re-run,
//! syncookies run twice, abandoned handshakes never reach accept), so none is kept.
//!
//! On any internal error the program fails open (SK_PASS without a selection: the kernel's
//! hash picks the listener) and counts the error in GLOBAL_COUNTERS.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock,
        sk_action::{SK_DROP, SK_PASS},
    },
    cty::c_void,
    helpers::{
        bpf_probe_read_kernel,
        generated::{self, bpf_loop},
    },
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use parsrv_common::{
    flags, policy, when_full, GlobalCounters, KernelOffsets, ProgramConfig, SlotCacheEntry,
    SlotCounters, MAX_SOCKETS,
};

// scan_step masks indices with MAX_SOCKETS - 1.
const _: () = assert!(MAX_SOCKETS.is_power_of_two());

#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SOCKETS, 0);

#[map]
static SLOT_BY_COOKIE: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

#[map]
static GLOBAL_COUNTERS: PerCpuArray<GlobalCounters> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONFIG: Array<ProgramConfig> = Array::with_max_entries(1, 0);

#[map]
static SLOT_CACHE: PerCpuArray<SlotCacheEntry> = PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

/// Per-CPU scratch: a word to turn `ctx->sk` into a number (see [`address_of`]), and a copy
/// of the group's `socks[]` for the scan.
#[repr(C)]
pub struct Scratch {
    member: u64,
    socks: [u64; MAX_SOCKETS as usize],
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Why the program failed open. The discriminant is the error's field in GlobalCounters,
/// counted after `no_config` (see [`count_failure`]).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Error {
    ReadFailed = 0,
    BadGroup = 1,
    UnknownSocket = 2,
    SelectFailed = 3,
}

/// One listener as the program sees it: its kernel address and how full its queue is.
#[derive(Clone, Copy)]
#[repr(C)]
struct Listener {
    /// `struct sock *` as a plain number (see [`address_of`]), so offsets can be added.
    addr: u64,
    /// Its position in the kernel's `socks[]` now.
    index: u32,
    /// Connections the queue can still take without overflowing, counting handshakes in
    /// progress as taken: `max + 1 - established - pending`. The kernel calls a listener full
    /// when `sk_ack_backlog > sk_max_ack_backlog` (a listen(4) queue holds 5), and it checks
    /// that at SYN time, before the child exists; counting pending handshakes keeps
    /// concurrent SYNs from overshooting. Negative when overcommitted.
    room: i64,
    /// The kernel itself would drop a SYN here now (`sk_acceptq_is_full`).
    kernel_full: bool,
}

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, Error> {
    // SAFETY: bpf_probe_read_kernel never faults; a bad address gives an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| Error::ReadFailed)
}

/// `ctx->sk` as a plain number. The verifier forbids arithmetic on a socket pointer and
/// refuses to reload a spilled pointer as a number, but (with CAP_PERFMON) lets a pointer be
/// stored in a map value, and a map value reads back as a number. Unlike laundering it
/// through bpf_probe_read_kernel, this costs no helper call (the per-CPU lookup is inlined).
#[inline(always)]
fn address_of(ctx: &SkReuseportContext) -> Result<u64, Error> {
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Error::ReadFailed)?;
    // SAFETY: reading a context field; then this CPU's scratch word, written and read back
    // volatile so the compiler keeps the round trip through the map.
    unsafe {
        let member: *mut bpf_sock = (*ctx.md).__bindgen_anon_3.sk;
        let word = core::ptr::addr_of_mut!((*scratch).member);
        core::ptr::write_volatile(word as *mut *mut bpf_sock, member);
        Ok(core::ptr::read_volatile(word))
    }
}

#[inline(always)]
fn listener(addr: u64, index: u32, off: &KernelOffsets) -> Result<Listener, Error> {
    // sk_max_ack_backlog follows sk_ack_backlog (the loader checks): one read for both.
    let [established, max]: [u32; 2] = read(addr + off.sk_ack_backlog as u64)?;
    let pending: u32 = read(addr + off.accept_queue_qlen as u64)?;
    Ok(Listener {
        addr,
        index,
        room: max as i64 + 1 - established as i64 - pending as i64,
        kernel_full: established > max,
    })
}

/// State of the scan for the socket with the most room, shared with [`scan_step`].
#[repr(C)]
struct Scan {
    /// This CPU's copy of `socks[0..num)`.
    socks: *const [u64; MAX_SOCKETS as usize],
    num: u64,
    first: u64,
    off: KernelOffsets,
    best: Listener,
    failed: bool,
}

/// The socket with the most room. The scan starts at the hash choice `first` so that ties
/// go to it (and after it, in group order): under even load this keeps the kernel's spread
/// instead of piling onto socket 0.
///
/// The walk runs under bpf_loop: the verifier checks [`scan_step`] once, whereas a plain
/// loop of up to MAX_SOCKETS iterations is verified iteration by iteration and exceeds its
/// one-million-instruction budget.
#[inline(always)]
fn most_room(
    socks: u64,
    num: u32,
    first: u32,
    first_listener: Listener,
    off: &KernelOffsets,
) -> Result<Listener, Error> {
    // One read for every socket pointer instead of one per socket.
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Error::ReadFailed)?;
    // SAFETY: this CPU's scratch element; num <= MAX_SOCKETS was checked by the caller.
    let copy = unsafe { core::ptr::addr_of_mut!((*scratch).socks) };
    let len = num.min(MAX_SOCKETS) * 8;
    // SAFETY: copies at most size_of_val(copy) bytes into it.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(copy as *mut c_void, len, socks as *const c_void)
    };
    if rc != 0 {
        return Err(Error::ReadFailed);
    }
    let mut scan = Scan {
        socks: copy,
        num: num as u64,
        first: first as u64,
        off: *off,
        best: first_listener,
        failed: false,
    };
    // SAFETY: scan_step has the callback signature bpf_loop expects and reads only `scan`.
    unsafe {
        bpf_loop(
            num - 1,
            scan_step as *mut c_void,
            &mut scan as *mut Scan as *mut c_void,
            0,
        );
    }
    if scan.failed {
        return Err(Error::ReadFailed);
    }
    Ok(scan.best)
}

/// One step of [`most_room`]: looks at the `step`-th socket after the hash choice.
#[inline(never)]
extern "C" fn scan_step(step: u64, scan: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer most_room gave it.
    let scan = unsafe { &mut *(scan as *mut Scan) };
    let mut index = scan.first + 1 + step;
    if index >= scan.num {
        index -= scan.num;
    }
    // SAFETY: `socks` is this CPU's scratch copy; the mask keeps the index in bounds for
    // the verifier (index < num <= MAX_SOCKETS already).
    let addr = unsafe { (*scan.socks)[(index & (MAX_SOCKETS as u64 - 1)) as usize] };
    let candidate = listener(addr, index as u32, &scan.off);
    match candidate {
        Ok(candidate) => {
            if candidate.room > scan.best.room {
                scan.best = candidate;
            }
            0 // next step
        }
        Err(_) => {
            scan.failed = true;
            1 // stop
        }
    }
}

/// What the program decided for one connection.
struct Decision {
    target: Listener,
    /// Set when the hash choice was full and the connection went elsewhere.
    redirected_from: Option<Listener>,
}

enum Outcome {
    /// Select `Decision::target` and pass.
    Select(Decision),
    /// Every socket is full and `when-full refuse`: answer with a RST.
    Refuse { hash_choice: Listener },
}

#[sk_reuseport(migrate)]
pub fn parsrv_select(ctx: SkReuseportContext) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        count_error(|c| c.no_config += 1);
        return SK_PASS;
    };
    match steer(&ctx, config) {
        Ok(verdict) => verdict,
        Err(error) => {
            count_failure(error);
            SK_PASS
        }
    }
}

#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &ProgramConfig) -> Result<u32, Error> {
    let off = &config.offsets;
    let migrating = ctx.migrating_sk().is_some();

    // `ctx->sk` is some member of the group (the closing listener during migration).
    let member = address_of(ctx)?;

    let group: u64 = read(member + off.sk_reuseport_cb as u64)?;
    if group == 0 {
        return Err(Error::BadGroup);
    }
    // Live listeners only: during migration the closing one has already moved to the
    // closed part of socks[].
    let num = read::<u16>(group + off.reuseport_num_socks as u64)? as u32;
    if num == 0 || num > MAX_SOCKETS {
        return Err(Error::BadGroup);
    }
    let socks = group + off.reuseport_socks as u64;

    // The kernel's own choice without a program: socks[reciprocal_scale(hash, num)]
    // (reuseport_select_sock_by_hash). A retransmitted SYN has the same hash.
    let first = ((ctx.hash() as u64 * num as u64) >> 32) as u32;
    let hash_choice = listener(read(socks + first as u64 * 8)?, first, off)?;

    if config.flags & flags::DRAINING != 0 && !migrating {
        let slot = slot_of(&hash_choice, config)?;
        count_slot(slot, |c| c.refused += 1);
        return Ok(SK_DROP);
    }

    let best = if config.policy == policy::REDIRECT && hash_choice.room > 0 {
        hash_choice // fast path: only the hash choice was read
    } else {
        most_room(socks, num, first, hash_choice, off)?
    };

    let outcome = if best.room > 0 || migrating {
        // Migration does not check the target's fullness and a SK_DROP would reset the
        // connection: with every queue full, the least full one takes it.
        Outcome::Select(Decision {
            target: best,
            // A redirect is a move away from a *full* hash choice; least-loaded picking a
            // socket with more room than a hash choice that had some is not one.
            redirected_from: (best.addr != hash_choice.addr && hash_choice.room <= 0)
                .then_some(hash_choice),
        })
    } else if config.when_full == when_full::REFUSE {
        Outcome::Refuse { hash_choice }
    } else {
        // Silent drop: hand the SYN to its hash choice. When that listener is full by the
        // kernel's own test, the kernel drops the SYN (ListenOverflows, counted here as
        // `dropped`) and the client retransmits into a fresh decision. When only pending
        // handshakes made it look full, the kernel takes the connection (`selected`).
        Outcome::Select(Decision {
            target: hash_choice,
            redirected_from: None,
        })
    };

    match outcome {
        Outcome::Refuse { hash_choice } => {
            let slot = slot_of(&hash_choice, config)?;
            count_slot(slot, |c| c.refused += 1);
            Ok(SK_DROP)
        }
        Outcome::Select(Decision {
            target,
            redirected_from,
        }) => {
            let slot = slot_of(&target, config)?;
            SOCKETS
                .select_reuseport(ctx, slot)
                .map_err(|_| Error::SelectFailed)?;
            if let Some(from) = redirected_from {
                if !migrating {
                    let from_slot = slot_of(&from, config)?;
                    count_slot(from_slot, |c| c.redirected_away += 1);
                }
            }
            count_slot(slot, |c| {
                if migrating {
                    c.migrated_in += 1;
                } else if target.kernel_full {
                    c.dropped += 1;
                } else {
                    c.selected += 1;
                }
            });
            Ok(SK_PASS)
        }
    }
}

/// The SOCKETS slot of a listener. Userspace made each listener's cookie exist (SO_COOKIE)
/// and mapped it to its slot; this CPU remembers the answer per `socks[]` position for as
/// long as userspace has not changed the group (CONFIG's generation).
#[inline(always)]
fn slot_of(listener: &Listener, config: &ProgramConfig) -> Result<u32, Error> {
    let cached = SLOT_CACHE
        .get_ptr_mut(listener.index)
        .ok_or(Error::BadGroup)?;
    // SAFETY: this CPU's cache entry; nothing else runs on this CPU meanwhile.
    let cached = unsafe { &mut *cached };
    if cached.addr == listener.addr && cached.generation == config.generation {
        return Ok(cached.slot);
    }
    let cookie: u64 = read(listener.addr + config.offsets.skc_cookie as u64)?;
    // SAFETY: plain u32 values, copied out at once.
    let slot = unsafe { SLOT_BY_COOKIE.get(cookie) }
        .copied()
        .ok_or(Error::UnknownSocket)?;
    *cached = SlotCacheEntry {
        addr: listener.addr,
        slot,
        generation: config.generation,
    };
    Ok(slot)
}

#[inline(always)]
fn count_slot(slot: u32, update: impl FnOnce(&mut SlotCounters)) {
    if let Some(counters) = SLOT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU element; this program is its only writer on this CPU.
        update(unsafe { &mut *counters });
    }
}

#[inline(always)]
fn count_error(update: impl FnOnce(&mut GlobalCounters)) {
    if let Some(counters) = GLOBAL_COUNTERS.get_ptr_mut(0) {
        // SAFETY: as in count_slot.
        update(unsafe { &mut *counters });
    }
}

/// Counts a fail-open `error` in its GlobalCounters field.
///
/// The error may come back through the bpf_loop callback, which wrote it to this frame's
/// stack. Linux 6.1's verifier then knows it only as "some u8", and LLVM compiles any choice
/// of field to `&counters + 8 * error`: refused as a possible access past the map value.
/// So the index is masked, and read through a volatile load first, because LLVM knows the
/// enum's range and would drop a mask it can prove useless.
#[inline(always)]
fn count_failure(error: Error) {
    const FIELDS: usize = size_of::<GlobalCounters>() / size_of::<u64>();
    const _: () = assert!(FIELDS == 5 && size_of::<GlobalCounters>() == 5 * 8);
    let code = error as u8;
    // SAFETY: a read of a local.
    let index = 1 + (unsafe { core::ptr::read_volatile(&code) } & 3) as usize;
    count_error(|c| {
        // SAFETY: GlobalCounters is repr(C) and Pod: five u64s, `no_config` first, then the
        // errors in Error's order.
        let fields = unsafe { &mut *(c as *mut GlobalCounters).cast::<[u64; FIELDS]>() };
        fields[index] += 1;
    });
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
