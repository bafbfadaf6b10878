//! Stall detection's adapter: looks at every slot (its queue, its program counters, its
//! handler), feeds [`crate::stall`], and carries out its decisions on the group's sockets
//! ([`Members::demote_stalled`], [`Members::promote`]).
//!
//! It looks every `stall::look_every(--stall-after)` while some queue holds a connection
//! that another serving handler could take, and every [`IDLE_LOOK`] otherwise, so that an
//! idle spawner stays (almost) asleep: a stall that starts from idle is seen within
//! `IDLE_LOOK + --stall-after`.

use std::{
    rc::Rc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{group::RunningGroup, members::Members};
use crate::{
    listeners::SocketState,
    spec::HandlerKind,
    stall::{self, Decision, Look, SlotStall},
    supervisor::process_stopped,
};

/// How often the slots are looked at while no queue waits (or no other handler could take
/// a queue).
const IDLE_LOOK: Duration = Duration::from_millis(500);

/// Per slot: times stalled, connections moved from its queue then, and times it looked
/// stalled but was left serving.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StallCounts {
    pub stalled: u64,
    pub moved: u64,
    pub spared: u64,
}

impl StallCounts {
    /// `slot`'s counts, made if it has none yet.
    fn of(group: &RunningGroup, slot: u32) -> std::cell::RefMut<'_, StallCounts> {
        std::cell::RefMut::map(group.stalls.borrow_mut(), |counts| {
            if counts.len() <= slot as usize {
                counts.resize(slot as usize + 1, StallCounts::default());
            }
            &mut counts[slot as usize]
        })
    }
}

/// Watches the group's slots for stalls until the group stops (not at all with
/// `--stall-after 0`).
pub(super) async fn watch(group: Rc<RunningGroup>) {
    let Some(after) = group.spec.stall_after() else {
        return;
    };
    let busy_look = stall::look_every(after);
    let mut detectors: Vec<SlotStall> = Vec::new();
    loop {
        let busy = {
            // A membership change (resize, restart) in progress: look next time.
            let Ok(_changing) = group.membership.try_lock() else {
                tokio::time::sleep(busy_look).await;
                continue;
            };
            look(&group, &mut detectors, after)
        };
        tokio::time::sleep(if busy { busy_look } else { IDLE_LOOK }).await;
    }
}

/// One look at every slot, and what follows from it; says whether a queue waits that another
/// handler could take (then the next look comes soon).
fn look(group: &RunningGroup, detectors: &mut Vec<SlotStall>, after: Duration) -> bool {
    let now = Instant::now();
    let decisions = {
        let members = group.members.borrow();
        detectors.resize_with(members.len() as usize, SlotStall::default);
        let serving = serving_slots(&members);
        let looks = match looks(group, &members) {
            Ok(looks) => looks,
            Err(e) => {
                log::error!("group {}: stall detection: {e}", group.spec.name);
                return false;
            }
        };
        // Who could take a queue (as of the last look), and the room each has now: a queue
        // moves only where it fits. In a group whose every queue is full, moving one would
        // overfill the others (the kernel's migration does not check room), and SYNs would
        // be dropped until they drain: seen in an emulated VM, where busy handlers that wait
        // for the CPU look stalled.
        let takers: Vec<(u32, u64)> = serving
            .iter()
            .copied()
            .filter(|s| detectors[*s as usize].takes_connections())
            .map(|s| (s, looks[s as usize].2))
            .collect();
        // Built-in handlers accept once ready; an exec'd server that sent READY=1 says so.
        let vouched = group.spec.handler != HandlerKind::Exec || group.spec.notify;
        // Room in the queues of the slots that take connections, but `slot`'s.
        let others_room = |slot: u32| -> u64 {
            takers
                .iter()
                .filter(|(s, _)| *s != slot)
                .map(|(_, room)| room)
                .sum()
        };
        let mut busy = false;
        let decisions: Vec<(u32, Decision, Look)> = (0u32..)
            .zip(detectors.iter_mut())
            .zip(looks)
            .map(|((slot, detector), (state, look, _))| {
                let decision = match state {
                    Some(SocketState::Serving) if serving.contains(&slot) => {
                        if vouched {
                            detector.vouch();
                        }
                        // A stall matters only where other handlers could take the queue.
                        let room = others_room(slot);
                        let others_take = room > 0 && room >= look.queue as u64;
                        busy |= look.queue > 0 && serving.len() > 1;
                        detector.serving(now, look, after, others_take)
                    }
                    Some(SocketState::Demoted) => {
                        busy = true;
                        detector.demoted(now, look, others_room(slot) > 0)
                    }
                    _ => {
                        detector.not_watched(Some(look));
                        Decision::Keep
                    }
                };
                (slot, decision, look)
            })
            .collect();
        if decisions.iter().all(|(_, d, _)| *d == Decision::Keep) {
            return busy;
        }
        decisions
    };
    // One queue moves per look: each Demote above was decided on the room the others had
    // before any move, so a second move in the same look could overfill them (two busy
    // handlers taken for stalled at once in an emulated VM moved 6 + 6 connections into the
    // same room, and SYNs were dropped). A second one is looked at again from the next look.
    let mut moved_one = false;
    for (slot, decision, look) in decisions {
        match decision {
            Decision::Keep => {}
            Decision::Demote if moved_one => detectors[slot as usize].not_now(now, look),
            // A thread of it is runnable: it may be in accept(), woken and about to take its
            // queue, and the move's shutdown would make that accept() fail with EINVAL
            // (measured in emulated VMs, where a blocking-accept server then exited). A
            // handler stalled in a sleep, a slow read or a stop has no runnable thread; one
            // busy on the CPU (a GC pause) is left alone too, and its queue waits.
            Decision::Demote
                if !look.stopped
                    && pid_of(group, slot).is_some_and(crate::procfs::any_thread_runnable) =>
            {
                StallCounts::of(group, slot).spared += 1;
                detectors[slot as usize].not_now(now, look);
            }
            Decision::Demote => {
                moved_one = demote(group, slot, look, after);
                if !moved_one {
                    StallCounts::of(group, slot).spared += 1;
                    detectors[slot as usize].not_now(now, look);
                }
            }
            Decision::Promote | Decision::Retry => {
                promote(group, slot, decision, &mut detectors[slot as usize])
            }
        }
    }
    true
}

/// The slots whose socket serves and whose handler is ready.
fn serving_slots(members: &Members) -> Vec<u32> {
    members
        .pairs()
        .filter(|(slot, listener)| {
            slot.state.borrow().ready && listener.state() == SocketState::Serving
        })
        .map(|(slot, _)| slot.index)
        .collect()
}

/// Each slot's socket state (`None` without a handler process), a look at it, and the
/// room in its queue (`capacity + 1 - depth`: the kernel calls a queue full above its
/// capacity).
fn looks(
    group: &RunningGroup,
    members: &Members,
) -> crate::Result<Vec<(Option<SocketState>, Look, u64)>> {
    let queues: Vec<(u32, u64)> = members
        .listeners()
        .iter()
        .map(|l| l.queue().map_or((0, 0), |q| (q.depth, q.free() as u64)))
        .collect();
    // Read at every look, idle ones too: a handler shows that it accepts (and may take a
    // stalled queue) by what it took between two looks, busy or not.
    let Some(steering) = members.steering() else {
        // Not started for a UDP group (spawner::start_group).
        return Ok(Vec::new());
    };
    let arrivals: Vec<u64> = steering
        .slot_counters(members.len())?
        .iter()
        .map(|c| c.selected + c.migrated_in)
        .collect();
    let built_in = group.spec.handler != HandlerKind::Exec;
    Ok(members
        .pairs()
        .zip(queues.into_iter().zip(arrivals))
        .map(|((slot, listener), ((queue, room), arrivals))| {
            let pid = slot.state.borrow().pid;
            let look = Look {
                queue,
                arrivals,
                accepted: built_in.then(|| slot.stats.stats().accepted.load(Ordering::Relaxed)),
                stopped: pid.is_some_and(process_stopped),
                // Only where connections wait: a few files per thread, per look.
                run_delay_ns: pid
                    .filter(|_| queue > 0)
                    .map_or(0, crate::procfs::run_delay_ns),
            };
            (pid.map(|_| listener.state()), look, room)
        })
        .collect())
}

fn pid_of(group: &RunningGroup, slot: u32) -> Option<u32> {
    group.members.borrow().slots()[slot as usize]
        .state
        .borrow()
        .pid
}

/// Demotes `slot`; false if its handler took its queue meanwhile (then it is left serving).
fn demote(group: &RunningGroup, slot: u32, look: Look, after: Duration) -> bool {
    let pid = pid_of(group, slot);
    let moved = group
        .members
        .borrow_mut()
        .demote_stalled(slot, look.stopped);
    match moved {
        Ok(None) => {
            log::debug!("handler {slot}: took its queue after it looked stalled: left serving");
            return false;
        }
        Ok(Some(moved)) => {
            {
                let mut counts = StallCounts::of(group, slot);
                counts.stalled += 1;
                counts.moved += moved;
            }
            log::warn!(
                "handler {slot} (pid {}) took no connection from its queue in {after:?}{}: \
                 moved {moved} queued connections to the other handlers; its socket takes \
                 new connections only when the others are full until it serves again",
                pid.map_or("-".to_owned(), |p| p.to_string()),
                if look.stopped { " (it is stopped)" } else { "" },
            );
        }
        Err(e) => log::error!("handler {slot}: cannot move the queue of its stalled socket: {e}"),
    }
    true
}

fn promote(group: &RunningGroup, slot: u32, decision: Decision, detector: &mut SlotStall) {
    let promoted = group.members.borrow_mut().promote(slot);
    match promoted {
        Ok(true) if decision == Decision::Retry => {
            log::info!("handler {slot}: tried again after its stall: its socket takes its share")
        }
        Ok(true) => {
            log::info!("handler {slot}: serves again after its stall: its socket takes its share")
        }
        Ok(false) => detector.not_watched(None),
        Err(e) => log::error!("handler {slot}: cannot put its socket back after a stall: {e}"),
    }
}
