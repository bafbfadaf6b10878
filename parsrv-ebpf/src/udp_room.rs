//! What the UDP programs share (`bin/udp_datagram.rs`, `bin/udp_flow.rs`, `bin/udp_quic.rs`;
//! shared types: `parsrv_common::udp`): the group's maps, and [`choose`], which picks a
//! socket with room for one datagram: the kernel's hash choice while its receive buffer has
//! room, else one other socket ([`Draw`]) if that one has room, else the socket with the
//! most room; when none has room, the kernel's hash. Each program's object includes this
//! file (`#[path]`), so each has its own copy of the maps.
//!
//! Room is `sk_rcvbuf - sk_rmem_alloc`, read with `bpf_probe_read_kernel` at offsets userspace
//! took from the running kernel's BTF. SK_REUSEPORT programs cannot look sockets up in a map
//! (the verifier allows them only bpf_sk_select_reuseport on one), so, as the TCP program
//! does, this walks the kernel's own `struct sock_reuseport` from `ctx->sk` (Linux 5.14+).

use aya_ebpf::{
    bindings::bpf_sock,
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{self, bpf_loop, bpf_sk_select_reuseport},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use parsrv_common::{
    reuseport::{LAST_RESORT_MARK, NO_HANDLER_MARK},
    udp::{
        UdpConfig, UdpErrors, UdpFailOpen, UdpOffsets, UdpSlotCacheEntry, UdpSlotCounters,
        FULL_MEMO_NS, MAX_SOCKETS,
    },
};

use crate::counting::count;

// scan_step masks indices with MAX_SOCKETS - 1.
const _: () = assert!(MAX_SOCKETS.is_power_of_two());

#[map]
pub static UDP_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static UDP_CONFIG: Array<UdpConfig> = Array::with_max_entries(1, 0);

#[map]
pub static UDP_SLOT_BY_COOKIE: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static UDP_SLOT_COUNTERS: PerCpuArray<UdpSlotCounters> =
    PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

#[map]
pub static UDP_ERRORS: PerCpuArray<UdpErrors> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the slot of the socket at each position of `socks[]` (see [`slot_of`]).
#[map]
static UDP_SLOT_CACHE: PerCpuArray<UdpSlotCacheEntry> =
    PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

/// When this CPU last found every socket of the group without room, and until when it
/// trusts that (see [`most_room_unless_full_lately`]), for CONFIG's generation.
#[repr(C)]
struct FullMemo {
    until_ns: u64,
    generation: u64,
}

#[map]
static UDP_FULL_MEMO: PerCpuArray<FullMemo> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: a word to turn `ctx->sk` into a number, a copy of the group's `socks[]`, and the
/// scan's state (never on the caller's stack: parsrv-ebpf's crate docs, "Verification
/// cost").
#[repr(C)]
struct Scratch {
    member: u64,
    socks: [u64; MAX_SOCKETS as usize],
    scan: Scan,
}

#[map]
static UDP_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A socket as the program sees it.
#[derive(Clone, Copy)]
#[repr(C)]
struct Socket {
    /// `struct sock *` as a plain number.
    addr: u64,
    /// Its position in the kernel's `socks[]`.
    index: u64,
    /// Free bytes in its receive buffer: `sk_rcvbuf - sk_rmem_alloc` (negative when the
    /// kernel let the last datagram overshoot).
    room: i64,
    /// `room`, less 2^40 for a spare's or a stalled handler's socket and 2^41 for one
    /// without a ready handler, so that any socket with a ready unmarked handler and room
    /// outranks them (u32 buffer sizes cannot reach 2^40). Datagrams sent to a socket
    /// without a handler wait in its buffer for the next one.
    rank: i64,
}

/// The scan's state.
#[repr(C)]
struct Scan {
    num: u64,
    first: u64,
    reserve: i64,
    off: UdpOffsets,
    _pad: u32,
    best: Socket,
    /// 1 once a socket with room was found.
    found: u64,
    failed: u64,
}

/// What [`choose`] decided for one datagram.
pub struct Choice {
    /// The slot of the kernel's hash choice ([`NO_SLOT`]: not found, the error counted).
    pub hash_slot: u32,
    /// The slot the datagram goes to ([`NO_SLOT`] when `outcome` is [`Outcome::Unknown`]).
    pub slot: u32,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Outcome {
    /// A socket's slot was not found (the error counted): the kernel's hash places it.
    Unknown,
    /// The hash choice, which has room (or the most of any with room).
    Kept,
    /// Another socket, because the hash choice had no room.
    Steered,
    /// No socket had room: the kernel's hash places it (and drops it if it does not fit).
    AllFull,
}

impl Choice {
    pub const UNKNOWN: Choice = Choice {
        hash_slot: NO_SLOT,
        slot: NO_SLOT,
        outcome: Outcome::Unknown,
    };
}

/// How [`choose`] draws the one other socket it tries when the hash choice has no room.
// Each program's object includes this file and uses one of the two.
#[allow(dead_code)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// At random for each datagram: the datagram program, where nothing follows a datagram.
    Random,
    /// From the datagram's 4-tuple hash: the flow and quic programs. A flow placed again
    /// (its entry expired, or the LRU table evicted it to make room for new ones, as a flood
    /// of new flows makes it do) lands where it was placed the first time, as long as its
    /// hash choice still has no room and that other socket still has some. Across flows the
    /// draws are as uniform as random ones.
    FromHash,
}

/// Picks the socket for one datagram by room, into `choice`; selects nothing ([`apply`]
/// does). An out-parameter rather than a returned value: see [`slot_of`] on what LLVM does
/// with a `Result` of a value.
#[inline(always)]
pub fn choose(
    ctx: &SkReuseportContext,
    config: &UdpConfig,
    draw: Draw,
    choice: &mut Choice,
) -> Result<(), UdpFailOpen> {
    let off = &config.offsets;
    // SAFETY: reading a context field.
    let member = address_of(unsafe { (*ctx.md).__bindgen_anon_3.sk })?;
    let reuse: u64 = read(member + off.sk_reuseport_cb as u64)?;
    if reuse == 0 {
        return Err(UdpFailOpen::BadGroup);
    }
    let num = read::<u16>(reuse + off.reuseport_num_socks as u64)? as u32;
    if num == 0 || num > MAX_SOCKETS {
        return Err(UdpFailOpen::BadGroup);
    }
    let socks = reuse + off.reuseport_socks as u64;
    // The kernel's own choice without a program: socks[reciprocal_scale(hash, num)]
    // (reuseport_select_sock_by_hash), which SK_PASS without a selection leaves in place.
    let first = ((ctx.hash() as u64 * num as u64) >> 32) as u32;
    let hash_choice = socket(read(socks + first as u64 * 8)?, first as u64, off)?;
    let reserve = config.reserve as i64;
    // The error of a slot that is not found is counted by slot_of; the kernel's hash
    // places the datagram.
    let from = slot_of(&hash_choice, config);
    choice.hash_slot = from;
    if from == NO_SLOT {
        return Ok(());
    }
    if hash_choice.rank >= reserve {
        // Fast path: the hash choice has room, and the kernel picks it by itself.
        choice.slot = from;
        choice.outcome = Outcome::Kept;
        return Ok(());
    }
    // The hash choice has no room (or is a marked socket's): one other socket, then, if
    // that has none either, every socket.
    let draw = match draw {
        // SAFETY: a helper without arguments.
        Draw::Random => unsafe { bpf_get_prandom_u32() },
        Draw::FromHash => mix(ctx.hash()),
    };
    let found = match second_choice(socks, num, first, draw, config)? {
        Some(other) => Some(other),
        None => most_room_unless_full_lately(socks, num, first, hash_choice, config)?,
    };
    let Some(best) = found else {
        choice.slot = from;
        choice.outcome = Outcome::AllFull;
        return Ok(());
    };
    if best.addr == hash_choice.addr {
        // A marked hash choice that still has the most room of any with room.
        choice.slot = from;
        choice.outcome = Outcome::Kept;
        return Ok(());
    }
    let slot = slot_of(&best, config);
    if slot == NO_SLOT {
        return Ok(());
    }
    choice.slot = slot;
    choice.outcome = Outcome::Steered;
    Ok(())
}

/// Makes `choice` so, and counts it.
#[inline(always)]
pub fn apply(ctx: &SkReuseportContext, choice: &Choice) -> Result<(), UdpFailOpen> {
    let from = choice.hash_slot;
    match choice.outcome {
        Outcome::Unknown => {}
        Outcome::Kept => count(&UDP_SLOT_COUNTERS, from, |c| c.kept += 1),
        Outcome::AllFull => count(&UDP_SLOT_COUNTERS, from, |c| c.all_full += 1),
        Outcome::Steered => {
            select(ctx, choice.slot)?;
            count(&UDP_SLOT_COUNTERS, from, |c| c.steered_away += 1);
            count(&UDP_SLOT_COUNTERS, choice.slot, |c| c.steered_in += 1);
        }
    }
    Ok(())
}

/// Counts `error`: the datagram is left to the kernel's hash choice.
#[inline(always)]
pub fn count_error(error: UdpFailOpen) {
    count(&UDP_ERRORS, 0, |errors| error.increment(errors));
}

#[inline(always)]
pub fn read<T>(addr: u64) -> Result<T, UdpFailOpen> {
    // SAFETY: bpf_probe_read_kernel never faults; a bad address gives an error.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| UdpFailOpen::ReadFailed)
}

/// A socket pointer as a plain number: stored in a map value, read back (the TCP program's
/// `queue::address_of_sock` says why this way).
#[inline(always)]
fn address_of(sk: *mut bpf_sock) -> Result<u64, UdpFailOpen> {
    let scratch = UDP_SCRATCH.get_ptr_mut(0).ok_or(UdpFailOpen::ReadFailed)?;
    // SAFETY: this CPU's scratch word, written and read back volatile so that the compiler
    // keeps the round trip through the map.
    unsafe {
        let word = core::ptr::addr_of_mut!((*scratch).member);
        core::ptr::write_volatile(word as *mut *mut bpf_sock, sk);
        Ok(core::ptr::read_volatile(word))
    }
}

#[inline(always)]
fn socket(addr: u64, index: u64, off: &UdpOffsets) -> Result<Socket, UdpFailOpen> {
    let rmem: i32 = read(addr + off.sk_rmem_alloc as u64)?;
    let rcvbuf: i32 = read(addr + off.sk_rcvbuf as u64)?;
    let mark: i32 = read(addr + off.skc_incoming_cpu as u64)?;
    let room = rcvbuf as i64 - rmem as i64;
    let penalty = if mark == NO_HANDLER_MARK {
        1 << 41
    } else if mark == LAST_RESORT_MARK {
        1 << 40
    } else {
        0
    };
    Ok(Socket {
        addr,
        index,
        room,
        rank: room - penalty,
    })
}

/// The power of two choices: the socket other than the hash choice that `draw` (uniform
/// over u32) names, if it is unmarked and has room. One read where a full scan of N sockets
/// costs N (the `udp-cost` benchmark: 13 us per datagram at 128 sockets), and a drawn
/// socket rather than the hash choice's neighbour, which would take every stalled socket's
/// share.
#[inline(always)]
fn second_choice(
    socks: u64,
    num: u32,
    first: u32,
    draw: u32,
    config: &UdpConfig,
) -> Result<Option<Socket>, UdpFailOpen> {
    if num < 2 {
        return Ok(None);
    }
    // 0..num-1, then past the hash choice: uniform over the others.
    let mut index = ((draw as u64 * (num - 1) as u64) >> 32) as u32;
    if index >= first {
        index += 1;
    }
    let other = socket(
        read(socks + index as u64 * 8)?,
        index as u64,
        &config.offsets,
    )?;
    Ok((other.rank >= config.reserve as i64).then_some(other))
}

/// MurmurHash3's 32-bit finaliser: the hash choice is taken from the hash's high bits, so
/// the second draw must not be (a plain multiple of the hash would put every flow of one
/// hash choice on nearly the same second socket).
#[inline(always)]
fn mix(mut hash: u32) -> u32 {
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// [`most_room`], unless this CPU scanned the group less than [`FULL_MEMO_NS`] ago and
/// found no socket with room: then None at once. When every buffer is full (handlers
/// overloaded, or a flood), a scan per datagram would cost the kernel the most exactly when
/// it has the least to spare; this way it costs one scan per CPU per interval. The price: a
/// datagram in that interval whose two choices are full goes to its hash choice even if
/// some third buffer has drained meanwhile.
#[inline(always)]
fn most_room_unless_full_lately(
    socks: u64,
    num: u32,
    first: u32,
    hash_choice: Socket,
    config: &UdpConfig,
) -> Result<Option<Socket>, UdpFailOpen> {
    let memo = UDP_FULL_MEMO
        .get_ptr_mut(0)
        .ok_or(UdpFailOpen::ReadFailed)?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's element; nothing else runs on this CPU meanwhile.
    let memo = unsafe { &mut *memo };
    if memo.generation == config.generation as u64 && now < memo.until_ns {
        return Ok(None);
    }
    let found = most_room(socks, num, first, hash_choice, config)?;
    if found.is_none() {
        *memo = FullMemo {
            until_ns: now + FULL_MEMO_NS,
            generation: config.generation as u64,
        };
    }
    Ok(found)
}

/// The socket with the highest rank among those with at least `reserve` bytes free,
/// starting at the hash choice so that ties go to it; None when no socket has room. Runs
/// under bpf_loop with its state in [`Scratch`] (parsrv-ebpf's crate docs say why).
#[inline(always)]
fn most_room(
    socks: u64,
    num: u32,
    first: u32,
    hash_choice: Socket,
    config: &UdpConfig,
) -> Result<Option<Socket>, UdpFailOpen> {
    let scratch = UDP_SCRATCH.get_ptr_mut(0).ok_or(UdpFailOpen::ReadFailed)?;
    // SAFETY: a read of a local; volatile so that Linux 6.1's verifier sees the bound of the
    // copy's length (queue::most_room in the TCP program says why).
    let num = unsafe { core::ptr::read_volatile(&num) };
    if num == 0 || num > MAX_SOCKETS {
        return Err(UdpFailOpen::BadGroup);
    }
    // The copy's length as the verifier can bound it: `num` itself for 1..=MAX_SOCKETS,
    // through a mask. Linux 6.1 does not carry the bound of `num - 1` (the form LLVM gives
    // the check above) over to `num` ("R2 unbounded memory access"); 6.12 and 6.18 do.
    let len = ((num.wrapping_sub(1) & (MAX_SOCKETS - 1)) + 1) * 8;
    // SAFETY: this CPU's scratch element; copies at most size_of_val(socks) bytes into it.
    let rc = unsafe {
        let copy = core::ptr::addr_of_mut!((*scratch).socks);
        generated::bpf_probe_read_kernel(copy as *mut c_void, len, socks as *const c_void)
    };
    if rc != 0 {
        return Err(UdpFailOpen::ReadFailed);
    }
    let reserve = config.reserve as i64;
    // SAFETY: this CPU's scratch element; nothing else runs on this CPU until the program
    // returns.
    unsafe {
        (*scratch).scan = Scan {
            num: num as u64,
            first: first as u64,
            reserve,
            off: config.offsets,
            _pad: 0,
            best: hash_choice,
            found: (hash_choice.room >= reserve) as u64,
            failed: 0,
        };
        bpf_loop(num - 1, scan_step as *mut c_void, core::ptr::null_mut(), 0);
        let scan = &(*scratch).scan;
        if scan.failed != 0 {
            return Err(UdpFailOpen::ReadFailed);
        }
        Ok((scan.found != 0).then_some(scan.best))
    }
}

/// One step of [`most_room`]: the `step`-th socket after the hash choice. 0 to go on, 1 to
/// stop.
#[inline(never)]
extern "C" fn scan_step(step: u64, _unused: *mut c_void) -> i64 {
    let Some(scratch) = UDP_SCRATCH.get_ptr_mut(0) else {
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
    match socket(addr, index, &scan.off) {
        Ok(candidate) => {
            if candidate.room >= scan.reserve
                && (scan.found == 0 || candidate.rank > scan.best.rank)
            {
                scan.best = candidate;
                scan.found = 1;
            }
            0
        }
        Err(_) => {
            scan.failed = 1;
            1
        }
    }
}

/// The slot of a socket, or [`NO_SLOT`] with the reason counted. Userspace made each
/// socket's cookie exist (SO_COOKIE) and mapped it to its slot; this CPU remembers the answer
/// per `socks[]` position while CONFIG's generation holds.
///
/// Not a `Result<u32, _>`: LLVM packs one into a register with the error's payload left
/// undefined, shifts it anyway where the paths merge, and the verifier refuses the read of
/// a register the helper call before had clobbered (`R3 !read_ok`).
#[inline(always)]
fn slot_of(socket: &Socket, config: &UdpConfig) -> u32 {
    let Some(cached) = UDP_SLOT_CACHE.get_ptr_mut(socket.index as u32) else {
        return failed(UdpFailOpen::BadGroup);
    };
    // SAFETY: this CPU's cache entry; nothing else runs on this CPU meanwhile.
    let cached = unsafe { &mut *cached };
    if cached.addr == socket.addr && cached.generation == config.generation {
        return cached.slot;
    }
    let Ok(cookie) = read::<u64>(socket.addr + config.offsets.skc_cookie as u64) else {
        return failed(UdpFailOpen::ReadFailed);
    };
    // SAFETY: plain u32 values, copied out at once.
    let Some(slot) = (unsafe { UDP_SLOT_BY_COOKIE.get(cookie) }).copied() else {
        return failed(UdpFailOpen::UnknownSocket);
    };
    *cached = UdpSlotCacheEntry {
        addr: socket.addr,
        slot,
        generation: config.generation,
    };
    slot
}

/// What [`slot_of`] answers when it found none.
pub const NO_SLOT: u32 = u32::MAX;

/// Counts `error` and answers [`NO_SLOT`].
#[inline(always)]
fn failed(error: UdpFailOpen) -> u32 {
    count_error(error);
    NO_SLOT
}

/// Makes the socket in `slot` the one the kernel gives the datagram to.
#[inline(always)]
pub fn select(ctx: &SkReuseportContext, slot: u32) -> Result<(), UdpFailOpen> {
    let mut key = slot;
    // SAFETY: the helper reads the key and looks it up in the map; `ctx.md` is the
    // program's context.
    let rc = unsafe {
        bpf_sk_select_reuseport(
            ctx.md,
            &UDP_SOCKETS as *const ReusePortSockArray as *mut c_void,
            &mut key as *mut u32 as *mut c_void,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(UdpFailOpen::SelectFailed)
    }
}
