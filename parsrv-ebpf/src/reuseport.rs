//! The SK_REUSEPORT program: for every new connection (and every connection migrating off a
//! closing listener) pick a listener of the group whose accept queue has room ([`queue`]),
//! at offsets userspace wrote to CONFIG.
//!
//! On any internal error the program fails open (SK_PASS without a selection: the kernel's
//! hash picks the listener) and counts the error in GLOBAL_COUNTERS.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_ktime_get_ns,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use parsrv_common::reuseport::{
    flags, policy, when_full, FailOpen, GlobalCounters, ProgramConfig, SlotCacheEntry,
    SlotCounters, MAX_SOCKETS,
};

use crate::{
    counting::count,
    queue::{address_of, listener, most_room, read, Found, Listener},
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

#[map]
static SLOT_CACHE: PerCpuArray<SlotCacheEntry> = PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

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
    let verdict = match CONFIG.get(0) {
        Some(config) => steer(&ctx, config),
        None => Err(FailOpen::NoConfig),
    };
    verdict.unwrap_or_else(|error| {
        count(&GLOBAL_COUNTERS, 0, |counters| error.increment(counters));
        report(&ctx, error);
        SK_PASS
    })
}

/// Tells the spawner's log that the program failed open, and why, at most once a second
/// per CPU (GLOBAL_COUNTERS counts every one). Only on the error path: the fast path does not
/// pay for it.
#[inline(never)]
fn report(ctx: &SkReuseportContext, error: FailOpen) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_REPORT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's element; nothing else runs on this CPU meanwhile.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < REPORT_EVERY_NS {
        return;
    }
    *last = now;
    // The spawner turns the code into the counter's name (GlobalCounters::COUNTERS).
    aya_log_ebpf::error!(ctx, "fail-open {} hash {}", error as u8, ctx.hash());
}

/// At most one report per CPU this often.
const REPORT_EVERY_NS: u64 = 1_000_000_000;

/// When this CPU last reported a fail-open error (not pinned: private to the program).
#[map]
static LAST_REPORT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &ProgramConfig) -> Result<u32, FailOpen> {
    let off = &config.offsets;
    let migrating = ctx.migrating_sk().is_some();

    // `ctx->sk` is some member of the group (the closing listener during migration).
    let member = address_of(ctx)?;

    let group: u64 = read(member + off.sk_reuseport_cb as u64)?;
    if group == 0 {
        return Err(FailOpen::BadGroup);
    }
    // Live listeners only: during migration the closing one has already moved to the
    // closed part of socks[].
    let num = read::<u16>(group + off.reuseport_num_socks as u64)? as u32;
    if num == 0 || num > MAX_SOCKETS {
        return Err(FailOpen::BadGroup);
    }
    let socks = group + off.reuseport_socks as u64;

    // The kernel's own choice without a program: socks[reciprocal_scale(hash, num)]
    // (reuseport_select_sock_by_hash). A retransmitted SYN has the same hash.
    let first = ((ctx.hash() as u64 * num as u64) >> 32) as u32;
    let hash_choice = listener(read(socks + first as u64 * 8)?, first, off)?;

    if config.flags & flags::DRAINING != 0 && !migrating {
        let slot = slot_of(&hash_choice, config)?;
        count(&SLOT_COUNTERS, slot, |c| c.refused += 1);
        return Ok(SK_DROP);
    }

    let found = if config.policy == policy::REDIRECT && hash_choice.room > 0 {
        // Fast path: only the hash choice was read.
        Found {
            best: hash_choice,
            most_free: hash_choice,
        }
    } else {
        most_room(socks, num, first, hash_choice, off)?
    };
    // Every queue looks full, but only because of handshakes in progress: a SYN flood fills
    // the SYN queues while the accept queues stay empty, and the kernel would serve this
    // client (syncookies). So does parsrv: the socket with the most room by the kernel's
    // own test takes it. Refusing or dropping is only for queues full of connections.
    let target = if found.best.room > 0 || migrating {
        // Migration does not check the target's fullness and a SK_DROP would reset the
        // connection: with every queue full, the least full one takes it.
        Some(found.best)
    } else if found.most_free.free > 0 {
        Some(found.most_free)
    } else {
        None
    };

    let outcome = if let Some(target) = target {
        Outcome::Select(Decision {
            target,
            // A redirect is a move away from a *full* hash choice; least-loaded picking a
            // socket with more room than a hash choice that had some is not one.
            redirected_from: (target.addr != hash_choice.addr && hash_choice.room <= 0)
                .then_some(hash_choice),
        })
    } else if config.when_full == when_full::REFUSE {
        Outcome::Refuse { hash_choice }
    } else {
        // Silent drop: hand the SYN to its hash choice, full by the kernel's own test, so the
        // kernel drops the SYN (ListenOverflows, counted here as `dropped`) and the client
        // retransmits into a fresh decision.
        Outcome::Select(Decision {
            target: hash_choice,
            redirected_from: None,
        })
    };

    match outcome {
        Outcome::Refuse { hash_choice } => {
            let slot = slot_of(&hash_choice, config)?;
            count(&SLOT_COUNTERS, slot, |c| c.refused += 1);
            Ok(SK_DROP)
        }
        Outcome::Select(Decision {
            target,
            redirected_from,
        }) => {
            let slot = slot_of(&target, config)?;
            SOCKETS
                .select_reuseport(ctx, slot)
                .map_err(|_| FailOpen::SelectFailed)?;
            if let Some(from) = redirected_from {
                if !migrating {
                    let from_slot = slot_of(&from, config)?;
                    count(&SLOT_COUNTERS, from_slot, |c| c.redirected_away += 1);
                }
            }
            count(&SLOT_COUNTERS, slot, |c| {
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
fn slot_of(listener: &Listener, config: &ProgramConfig) -> Result<u32, FailOpen> {
    let cached = SLOT_CACHE
        .get_ptr_mut(listener.index)
        .ok_or(FailOpen::BadGroup)?;
    // SAFETY: this CPU's cache entry; nothing else runs on this CPU meanwhile.
    let cached = unsafe { &mut *cached };
    if cached.addr == listener.addr && cached.generation == config.generation {
        return Ok(cached.slot);
    }
    let cookie: u64 = read(listener.addr + config.offsets.skc_cookie as u64)?;
    // SAFETY: plain u32 values, copied out at once.
    let slot = unsafe { SLOT_BY_COOKIE.get(cookie) }
        .copied()
        .ok_or(FailOpen::UnknownSocket)?;
    *cached = SlotCacheEntry {
        addr: listener.addr,
        slot,
        generation: config.generation,
    };
    Ok(slot)
}
