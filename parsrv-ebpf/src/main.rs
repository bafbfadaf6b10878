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
    helpers::{bpf_probe_read_kernel, generated::bpf_loop},
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use parsrv_common::{
    policy, when_full, GlobalCounters, KernelOffsets, ProgramConfig, SlotCounters, MAX_SOCKETS,
};

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

/// Why the program failed open.
enum Error {
    ReadFailed,
    BadGroup,
    UnknownSocket,
    SelectFailed,
}

/// One listener as the program sees it: its kernel address and how full its queue is.
#[derive(Clone, Copy)]
#[repr(C)]
struct Listener {
    /// `struct sock *`, as a plain number: the verifier forbids arithmetic on `ctx->sk`
    /// itself, so every address here comes out of `bpf_probe_read_kernel`.
    addr: u64,
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

#[inline(always)]
fn listener(addr: u64, off: &KernelOffsets) -> Result<Listener, Error> {
    let established: u32 = read(addr + off.sk_ack_backlog as u64)?;
    let max: u32 = read(addr + off.sk_max_ack_backlog as u64)?;
    let pending: u32 = read(addr + off.accept_queue_qlen as u64)?;
    Ok(Listener {
        addr,
        room: max as i64 + 1 - established as i64 - pending as i64,
        kernel_full: established > max,
    })
}

/// State of the scan for the socket with the most room, shared with [`scan_step`].
#[repr(C)]
struct Scan {
    socks: u64,
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
    let mut scan = Scan {
        socks,
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
    let candidate = read(scan.socks + index * 8).and_then(|addr| listener(addr, &scan.off));
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
            count_error(|c| match error {
                Error::ReadFailed => c.read_failed += 1,
                Error::BadGroup => c.bad_group += 1,
                Error::UnknownSocket => c.unknown_socket += 1,
                Error::SelectFailed => c.select_failed += 1,
            });
            SK_PASS
        }
    }
}

#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &ProgramConfig) -> Result<u32, Error> {
    let off = &config.offsets;
    let migrating = ctx.migrating_sk().is_some();

    // `ctx->sk` is some member of the group (the closing listener during migration). Copy
    // the pointer through the stack into a scalar so that we may add offsets to it.
    // SAFETY: reading a field of the context the kernel handed us.
    let member: *mut bpf_sock = unsafe { (*ctx.md).__bindgen_anon_3.sk };
    let member: u64 = read(&member as *const *mut bpf_sock as u64)?;

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
    let hash_choice = listener(read(socks + first as u64 * 8)?, off)?;

    let best = if config.policy == policy::REDIRECT && hash_choice.room > 0 {
        hash_choice // fast path: one listener read
    } else {
        most_room(socks, num, first, hash_choice, off)?
    };

    let outcome = if best.room > 0 || migrating {
        // Migration does not check the target's fullness and a SK_DROP would reset the
        // connection: with every queue full, the least full one takes it.
        Outcome::Select(Decision {
            target: best,
            redirected_from: (best.addr != hash_choice.addr).then_some(hash_choice),
        })
    } else if config.when_full == when_full::REFUSE {
        Outcome::Refuse { hash_choice }
    } else {
        // Silent drop: hand the SYN to a listener the kernel itself considers full, and it
        // drops it (ListenOverflows) for the client to retransmit. If pending handshakes
        // fill the queues but none is full yet, the hash choice takes the connection.
        Outcome::Select(Decision {
            target: hash_choice,
            redirected_from: None,
        })
    };

    match outcome {
        Outcome::Refuse { hash_choice } => {
            let slot = slot_of(hash_choice.addr, off)?;
            count_slot(slot, |c| c.refused += 1);
            Ok(SK_DROP)
        }
        Outcome::Select(Decision {
            target,
            redirected_from,
        }) => {
            let slot = slot_of(target.addr, off)?;
            SOCKETS
                .select_reuseport(ctx, slot)
                .map_err(|_| Error::SelectFailed)?;
            if let Some(from) = redirected_from {
                if !migrating {
                    let from_slot = slot_of(from.addr, off)?;
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

/// The SOCKETS slot of a listener, through its cookie (userspace made each cookie exist with
/// SO_COOKIE before registering the socket).
#[inline(always)]
fn slot_of(addr: u64, off: &KernelOffsets) -> Result<u32, Error> {
    let cookie: u64 = read(addr + off.skc_cookie as u64)?;
    // SAFETY: plain u32 values, copied out at once.
    unsafe { SLOT_BY_COOKIE.get(&cookie) }
        .copied()
        .ok_or(Error::UnknownSocket)
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
