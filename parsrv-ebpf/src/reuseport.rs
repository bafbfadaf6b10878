//! The SK_REUSEPORT program: for every new connection (and every connection migrating off a
//! closing listener) pick a listener of the group whose accept queue has room ([`queue`]),
//! at offsets userspace wrote to CONFIG.
//!
//! On any internal error the program fails open (SK_PASS without a selection: the kernel's
//! hash picks the listener) and counts the error in GLOBAL_COUNTERS.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    cty::{c_long, c_void},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, generated::bpf_sk_select_reuseport},
    macros::{map, sk_reuseport},
    maps::{HashMap, PerCpuArray, SockMap},
    programs::SkReuseportContext,
};
use parsrv_common::reuseport::{
    affinity::{self as shared_affinity, DispatchEntry},
    flags, policy, when_full, FailOpen, GlobalCounters, ProgramConfig, SlotCacheEntry,
    SlotCounters, MAX_SOCKETS,
};

use crate::{
    affinity, alerts,
    counting::{count, due},
    queue::{address_of, listener, most_room, read, Found, Listener},
    sockets::{CONFIG, SOCKETS},
};

#[map]
static SLOT_BY_COOKIE: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static SLOT_COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

#[map]
static GLOBAL_COUNTERS: PerCpuArray<GlobalCounters> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SLOT_CACHE: PerCpuArray<SlotCacheEntry> = PerCpuArray::with_max_entries(MAX_SOCKETS, 0);

/// The group as the program found it for one connection.
struct Group {
    /// Address of the kernel's `socks[]`, and how many live listeners it holds.
    socks: u64,
    num: u32,
    /// The kernel's hash choice: its position, and the listener there.
    first: u32,
    hash_choice: Listener,
    /// The connection is migrating off a closing listener.
    migrating: bool,
}

/// What the program decided for one connection.
struct Decision {
    target: Listener,
    slot: u32,
    /// The slot of a full hash choice the connection was steered away from, or
    /// [`NOT_REDIRECTED`]. (Not an `Option`: LLVM fills a `None`'s payload with whatever a
    /// register holds, a pointer included, and the verifier refuses arithmetic on it.)
    redirected_from: u32,
    /// Already selected: following a client's entry selects its slot to learn whether the
    /// entry still holds.
    selected: bool,
}

enum Outcome {
    /// Select `Decision::slot` (unless done) and pass.
    Select(Decision),
    /// Answer with a RST, counted on `slot`.
    Refuse { slot: u32 },
}

/// Where a client's entry led.
enum Followed {
    /// Its socket was selected.
    Selected(Decision),
    /// Its socket is in the group but cannot take the connection now.
    Full { target: Listener, slot: u32 },
    /// Idle for longer than the time-out.
    Expired,
    /// Its socket left the group, was replaced, or is the one closing.
    Stale,
}

/// `Decision::redirected_from` of a connection that went where it was meant to.
const NOT_REDIRECTED: u32 = u32::MAX;

/// A listener reached through a client's entry rather than through `socks[]`: its position
/// there is not needed (its slot is in the entry).
const NOT_FROM_SOCKS: u32 = u32::MAX;

#[sk_reuseport(migrate)]
pub fn parsrv_select(ctx: SkReuseportContext) -> u32 {
    let verdict = match CONFIG.get(0) {
        Some(config) => steer(&ctx, config),
        None => Err(FailOpen::NoConfig),
    };
    match verdict {
        Ok(Verdict { action, alert }) => {
            // Once, here, where every path has merged: called from `finish`, the alert
            // would be verified again on each of the program's paths.
            if alert != NO_ALERT {
                alerts::alert(alert - 1);
            }
            action
        }
        Err(error) => {
            count(&GLOBAL_COUNTERS, 0, |counters| error.increment(counters));
            report(&ctx, error);
            SK_PASS
        }
    }
}

/// What the program answers the kernel, and which slot to send a queue alert for.
struct Verdict {
    action: u32,
    /// The slot + 1, or [`NO_ALERT`].
    alert: u32,
}

const NO_ALERT: u32 = 0;

/// Tells the spawner's log that the program failed open, and why, at most once a second
/// per CPU (GLOBAL_COUNTERS counts every one). Only on the error path: the fast path does not
/// pay for it.
#[inline(never)]
fn report(ctx: &SkReuseportContext, error: FailOpen) {
    if !due(&LAST_REPORT, REPORT_EVERY_NS) {
        return;
    }
    // The spawner turns the code into the counter's name (GlobalCounters::COUNTERS).
    aya_log_ebpf::error!(ctx, "fail-open {} hash {}", error as u8, ctx.hash());
}

/// At most one report per CPU this often.
const REPORT_EVERY_NS: u64 = 1_000_000_000;

/// When this CPU last reported a fail-open error (not pinned: private to the program).
#[map]
static LAST_REPORT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn steer(ctx: &SkReuseportContext, config: &ProgramConfig) -> Result<Verdict, FailOpen> {
    let migrating = ctx.migrating_sk().is_some();
    // `ctx->sk` is some member of the group (the closing listener during migration).
    let member = address_of(ctx)?;
    let draining = config.flags & flags::DRAINING != 0 && !migrating;
    let outcome = if !draining && config.affinity.mode == shared_affinity::mode::CLIENT {
        // Before reading the group: a client that follows its entry needs none of it.
        steer_client(ctx, config, member, migrating)?
    } else {
        let group = Group::of(ctx, config, member, migrating)?;
        if draining {
            Outcome::Refuse {
                slot: slot_of(&group.hash_choice, config)?,
            }
        } else {
            decide(config, &group)?
        }
    };
    finish(ctx, outcome, migrating)
}

impl Group {
    /// The group `member` belongs to, and the kernel's hash choice in it.
    #[inline(always)]
    fn of(
        ctx: &SkReuseportContext,
        config: &ProgramConfig,
        member: u64,
        migrating: bool,
    ) -> Result<Group, FailOpen> {
        let off = &config.offsets;
        let reuse: u64 = read(member + off.sk_reuseport_cb as u64)?;
        if reuse == 0 {
            return Err(FailOpen::BadGroup);
        }
        // Live listeners only: during migration the closing one has already moved to the
        // closed part of socks[].
        let num = read::<u16>(reuse + off.reuseport_num_socks as u64)? as u32;
        if num == 0 || num > MAX_SOCKETS {
            return Err(FailOpen::BadGroup);
        }
        let socks = reuse + off.reuseport_socks as u64;
        // The kernel's own choice without a program: socks[reciprocal_scale(hash, num)]
        // (reuseport_select_sock_by_hash). A retransmitted SYN has the same hash.
        let first = ((ctx.hash() as u64 * num as u64) >> 32) as u32;
        let hash_choice = listener(read(socks + first as u64 * 8)?, first, off)?;
        Ok(Group {
            socks,
            num,
            first,
            hash_choice,
            migrating,
        })
    }
}

/// The policy's choice for a connection on its own: the hash choice or the socket with most
/// room, or what `when-full` says when every socket is full.
#[inline(always)]
fn decide(config: &ProgramConfig, group: &Group) -> Result<Outcome, FailOpen> {
    let hash_choice = group.hash_choice;
    let found = if config.policy == policy::REDIRECT && hash_choice.room > 0 {
        // Fast path: only the hash choice was read.
        Found {
            best: hash_choice,
            most_free: hash_choice,
        }
    } else if let Some(best) = two_choices(config, group)? {
        Found {
            best,
            most_free: best,
        }
    } else {
        most_room(
            group.socks,
            group.num,
            group.first,
            hash_choice,
            &config.offsets,
        )?
    };
    // Every queue looks full, but only because of handshakes in progress: a SYN flood fills
    // the SYN queues while the accept queues stay empty, and the kernel would serve this
    // client (syncookies). So does parsrv: the socket with the most room by the kernel's
    // own test takes it. Refusing or dropping is only for queues full of connections.
    //
    // With every socket that has a handler full by that test too, a socket whose handler is
    // being started takes it if its queue has a free place (`Listener::free` ranks it
    // there): the connection waits for that handler instead of being dropped.
    //
    // When even that finds no room: `when-full refuse` answers with a RST; `drop` hands the
    // SYN to the socket with the most room by the kernel's test, which is full by that test,
    // so the kernel drops it (ListenOverflows, counted here as `dropped`) and the client
    // retransmits into a fresh decision. Ties go to the hash choice (the scan starts there).
    //
    // A migrating connection is never refused: the kernel's migration does not check the
    // target's fullness and a SK_DROP would reset it, so with every queue full the least
    // full one (by the same ranks) takes it.
    let room_found = found.best.room > 0;
    if !room_found
        && found.most_free.kernel_full
        && !group.migrating
        && config.when_full == when_full::REFUSE
    {
        return Ok(Outcome::Refuse {
            slot: slot_of(&hash_choice, config)?,
        });
    }
    let target = if room_found {
        found.best
    } else {
        found.most_free
    };
    Ok(Outcome::Select(Decision {
        target,
        slot: slot_of(&target, config)?,
        // A redirect is a move away from a *full* hash choice to a socket that takes the
        // connection; least-loaded picking a socket with more room than a hash choice that
        // had some is not one, nor is a drop.
        redirected_from: if target.addr != hash_choice.addr
            && hash_choice.room <= 0
            && !target.kernel_full
        {
            slot_of(&hash_choice, config)?
        } else {
            NOT_REDIRECTED
        },
        selected: false,
    }))
}

/// The power of two choices (`policy::TWO_CHOICES`): the hash choice or one other socket
/// at random, whichever has more room, without looking at the rest. `None` when the policy
/// is another, or both have no room (then every socket is looked at, so that a connection is
/// dropped only when all are full).
#[inline(always)]
fn two_choices(config: &ProgramConfig, group: &Group) -> Result<Option<Listener>, FailOpen> {
    if config.policy != policy::TWO_CHOICES || group.num < 2 {
        return Ok(None);
    }
    let hash_choice = group.hash_choice;
    // An empty queue (nothing waiting, no handshake pending) of a socket with a handler and
    // no mark has all the room any socket of the group has (their queue lengths are one
    // setting), so the other choice could only tie, and ties go to the hash choice: the
    // answer is known without drawing or reading it. At ordinary load most queues are empty
    // when a SYN arrives, so this policy then costs what `redirect` costs; the second read
    // is paid only where a queue has formed. (A handler that called listen() again with a
    // longer queue is reported, spawner/audit; against it this ties where the full
    // comparison would not.)
    if hash_choice.limit > 0 && hash_choice.room == hash_choice.limit + 1 {
        return Ok(Some(hash_choice));
    }
    // Another position than the hash choice, uniformly: 0..num-1, skipping `first`.
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let mut index = ((random as u64 * (group.num - 1) as u64) >> 32) as u32;
    if index >= group.first {
        index += 1;
    }
    let other = listener(
        read(group.socks + index as u64 * 8)?,
        index,
        &config.offsets,
    )?;
    let best = if other.room > hash_choice.room {
        other
    } else {
        hash_choice
    };
    Ok((best.room > 0).then_some(best))
}

/// Client affinity: the connection goes where its client's entry in the dispatch table
/// says; a client without one is decided by the policy and placed under the client lock.
#[inline(always)]
fn steer_client(
    ctx: &SkReuseportContext,
    config: &ProgramConfig,
    member: u64,
    migrating: bool,
) -> Result<Outcome, FailOpen> {
    let client = affinity::client_of(ctx, &config.affinity)?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = affinity::entry_of(&client) {
        // SAFETY: a map value; other CPUs may write last_seen_ns meanwhile, which a torn
        // read of it can only make look older or newer by one refresh.
        let held = unsafe { *entry };
        match follow(ctx, config, entry, &held, member, migrating, now)? {
            Followed::Selected(decision) => {
                // Refreshed coarsely: a write per connection would bounce the entry's cache
                // line between CPUs for an idle clock that needs no precision.
                if held.idle_ns(now) > config.affinity.timeout_ns >> 3 {
                    // SAFETY: a plain store into the map value.
                    unsafe { (*entry).last_seen_ns = now };
                }
                affinity::tally(|c| c.hits += 1);
                return Ok(Outcome::Select(decision));
            }
            Followed::Full { target, slot } => {
                if config.affinity.when_full == shared_affinity::when_full::KEEP {
                    return Ok(keep(config, target, slot));
                }
                let group = Group::of(ctx, config, member, migrating)?;
                let outcome = decide(config, &group)?;
                if let Outcome::Select(decision) = &outcome {
                    if decision.target.addr != held.socket && !decision.target.kernel_full {
                        let moved = entry_for(config, decision, now)?;
                        affinity::replace(&client, &moved);
                        affinity::tally(|c| c.moved += 1);
                    }
                }
                return Ok(outcome);
            }
            Followed::Expired => {
                affinity::tally(|c| c.expired += 1);
                affinity::forget(&client);
            }
            Followed::Stale => {
                affinity::tally(|c| c.stale += 1);
                affinity::forget(&client);
            }
        }
    }
    // A client without an entry: the policy decides, and the client lock records it.
    let group = Group::of(ctx, config, member, migrating)?;
    let outcome = decide(config, &group)?;
    let Outcome::Select(decision) = &outcome else {
        return Ok(outcome);
    };
    if decision.target.kernel_full {
        // Every socket is full and the kernel drops this SYN: nothing was decided.
        return Ok(outcome);
    }
    let entry = entry_for(config, decision, now)?;
    if affinity::place(&client, &entry).is_ok() {
        affinity::tally(|c| c.new_clients += 1);
        return Ok(outcome);
    }
    // Another CPU placed this client's entry between our lookup and our insert: follow it,
    // whatever its socket's queue, so both connections reach one handler.
    affinity::tally(|c| c.lock_races += 1);
    if let Some(winner) = affinity::entry_of(&client) {
        // SAFETY: a map value, copied.
        let winner = unsafe { *winner };
        let target = listener(winner.socket, NOT_FROM_SOCKS, &config.offsets)?;
        if select(ctx, winner.slot).is_ok() {
            return Ok(Outcome::Select(Decision {
                target,
                slot: winner.slot,
                redirected_from: NOT_REDIRECTED,
                selected: true,
            }));
        }
    }
    Ok(outcome)
}

/// Follows a client's entry: selects its socket if the entry still holds and the socket
/// can take the connection.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn follow(
    ctx: &SkReuseportContext,
    config: &ProgramConfig,
    stored: *mut DispatchEntry,
    entry: &DispatchEntry,
    member: u64,
    migrating: bool,
    now: u64,
) -> Result<Followed, FailOpen> {
    if entry.idle_ns(now) > config.affinity.timeout_ns {
        return Ok(Followed::Expired);
    }
    if migrating && entry.socket == member {
        // Its socket is the one closing: the client goes with its connection.
        return Ok(Followed::Stale);
    }
    if entry.generation != config.generation {
        // The group's membership changed since the entry was checked: is it still the
        // socket the entry was made for (a cookie is never reused), and still the group's
        // under that slot? Until the next change, the answer holds, which spares the
        // per-connection path a probe read and a hash lookup.
        let cookie: u64 = read(entry.socket + config.offsets.skc_cookie as u64)?;
        // SAFETY: plain u32 values, copied out at once.
        let registered = unsafe { SLOT_BY_COOKIE.get(cookie) }.copied();
        if cookie != entry.cookie || registered != Some(entry.slot) {
            return Ok(Followed::Stale);
        }
        // SAFETY: a plain store into the map value.
        unsafe { (*stored).generation = config.generation };
    }
    let target = listener(entry.socket, NOT_FROM_SOCKS, &config.offsets)?;
    if target.room <= 0 && !migrating {
        return Ok(Followed::Full {
            target,
            slot: entry.slot,
        });
    }
    // The kernel empties a listener's SOCKETS slot when it stops listening, before
    // userspace forgets its cookie: a refusal here means it is gone.
    if select(ctx, entry.slot).is_err() {
        return Ok(Followed::Stale);
    }
    Ok(Followed::Selected(Decision {
        target,
        slot: entry.slot,
        redirected_from: NOT_REDIRECTED,
        selected: true,
    }))
}

/// `affinity-when-full keep`: the client waits for its own socket.
#[inline(always)]
fn keep(config: &ProgramConfig, target: Listener, slot: u32) -> Outcome {
    if target.kernel_full {
        affinity::tally(|c| c.waited += 1);
        if config.when_full == when_full::REFUSE {
            return Outcome::Refuse { slot };
        }
    } else {
        // Full only by handshakes in progress (or awaiting its handler with an empty
        // queue): the kernel still takes it.
        affinity::tally(|c| c.hits += 1);
    }
    // The kernel drops the SYN at a full socket; the client retransmits into a new decision.
    Outcome::Select(Decision {
        target,
        slot,
        redirected_from: NOT_REDIRECTED,
        selected: false,
    })
}

/// The entry that sends a client where `decision` sent this connection.
#[inline(always)]
fn entry_for(
    config: &ProgramConfig,
    decision: &Decision,
    now: u64,
) -> Result<DispatchEntry, FailOpen> {
    Ok(DispatchEntry {
        socket: decision.target.addr,
        cookie: read(decision.target.addr + config.offsets.skc_cookie as u64)?,
        decided_ns: now,
        last_seen_ns: now,
        slot: decision.slot,
        generation: config.generation,
    })
}

/// Carries out an outcome and counts it on its slot.
#[inline(always)]
fn finish(
    ctx: &SkReuseportContext,
    outcome: Outcome,
    migrating: bool,
) -> Result<Verdict, FailOpen> {
    match outcome {
        Outcome::Refuse { slot } => {
            count(&SLOT_COUNTERS, slot, |c| c.refused += 1);
            Ok(Verdict {
                action: SK_DROP,
                alert: slot + 1,
            })
        }
        Outcome::Select(Decision {
            target,
            slot,
            redirected_from,
            selected,
        }) => {
            if !selected {
                select(ctx, slot).map_err(|_| FailOpen::SelectFailed)?;
            }
            if redirected_from != NOT_REDIRECTED && !migrating {
                count(&SLOT_COUNTERS, redirected_from, |c| c.redirected_away += 1);
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
            // A queue filling up (or every queue full): the autoscaler may be asleep.
            // Arithmetic, not a branch: this runs on every path of the program.
            let alert = target.half_full() & (!migrating) as u32;
            Ok(Verdict {
                action: SK_PASS,
                alert: alert * (slot + 1),
            })
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

/// Makes the socket in `slot` the one the kernel gives the connection to. Fails (-ENOENT)
/// if the slot is empty and (-EBADFD) if its socket is in another reuseport group, i.e.
/// bound to another address of the group.
#[inline(always)]
pub fn select(ctx: &SkReuseportContext, slot: u32) -> Result<(), c_long> {
    let mut key = slot;
    // SAFETY: the helper reads the key and looks it up in the map; `ctx.md` is the
    // program's context.
    let rc = unsafe {
        bpf_sk_select_reuseport(
            ctx.md,
            &SOCKETS as *const SockMap as *mut c_void,
            &mut key as *mut u32 as *mut c_void,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}
