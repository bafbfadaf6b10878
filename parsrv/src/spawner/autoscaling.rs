//! The autoscaler's loop (`--handlers MIN..MAX`): samples the group while there is
//! something to see, applies the decisions of the policy in [`crate::autoscale`], and sleeps
//! on the program's queue alerts while the queues stay empty. A UDP group is sampled the
//! same way, its receive buffers in place of the accept queues; its programs send no
//! alerts, so it is sampled all the time.

use std::{rc::Rc, time::Instant};

use super::group::RunningGroup;
use crate::{
    autoscale::{self, Autoscaler, Sample},
    dataplane::alerts::QueueAlerts,
};

/// Samples the group every [`autoscale::SAMPLE_EVERY`] while its queues hold connections,
/// and applies the policy's decisions. After [`autoscale::QUIET_FOR`] of empty queues it
/// sleeps until a queue alert or a due step down; without alerts (a group adopted from an
/// older parsrv) it samples all the time.
pub(super) async fn run(group: Rc<RunningGroup>) {
    let mut scaler = Autoscaler::new(group.spec.handlers.min, group.spec.handlers.max);
    let mut alerts = group.take_queue_alerts().and_then(|ring| {
        QueueAlerts::new(ring)
            .map_err(|e| {
                log::warn!("autoscale: cannot wait for queue alerts ({e}): sampling all the time")
            })
            .ok()
    });
    let mut ticker = tokio::time::interval(autoscale::SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let quiet = quiet_since.is_some_and(|at| at.elapsed() >= autoscale::QUIET_FOR);
        if let Some(ring) = alerts.as_mut().filter(|_| quiet) {
            // Alerts sent while awake are old news.
            ring.discard();
            let due = scaler.next_step_down(group.handlers());
            let woken = tokio::select! {
                woken = ring.next() => woken,
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => Ok(()),
                // A resize by hand: the size the step down is measured from changed.
                _ = group.resized.notified() => Ok(()),
            };
            if let Err(e) = woken {
                log::error!(
                    "autoscale: waiting for queue alerts failed ({e}): sampling all the time"
                );
                alerts = None;
            }
            quiet_since = None;
            ticker.reset();
        } else {
            ticker.tick().await;
        }
        let Some(sample) = sample(&group) else {
            continue;
        };
        if sample.queued == 0 {
            quiet_since.get_or_insert(sample.at);
        } else {
            quiet_since = None;
        }
        let Some(decision) = scaler.observe(sample) else {
            continue;
        };
        // A resize or restart by hand is under way: its outcome counts, not ours.
        let Ok(_changing) = group.membership.try_lock() else {
            continue;
        };
        log::info!(
            "autoscale: {} -> {} handlers: {}",
            decision.from,
            decision.to,
            decision.reason
        );
        group.record_decision(format!(
            "{} -> {}: {}",
            decision.from, decision.to, decision.reason
        ));
        if let Err(e) = group.resize_to(decision.to).await {
            log::error!("autoscale: resizing to {} failed: {e}", decision.to);
        }
    }
}

fn sample(group: &RunningGroup) -> Option<Sample> {
    let members = group.members();
    let occupancy = members.occupancy();
    // What the program could place nowhere: a TCP group's drops and refusals, a UDP
    // group's datagrams that found no socket with room (left to the kernel's hash).
    let rejected = match (members.steering(), members.datagrams()) {
        (Some(steering), _) => {
            let counters = steering.slot_counters(members.len()).ok()?;
            counters.iter().map(|c| c.dropped + c.refused).sum()
        }
        (None, Some(datagrams)) => {
            let counters = datagrams.slot_counters(members.len()).ok()?;
            counters.iter().map(|c| c.all_full).sum()
        }
        (None, None) => return None,
    };
    Some(Sample {
        at: Instant::now(),
        // The group's size, as a resize counts it: its spares are not in it (counted, a
        // step from 1 handler and a spare went "2 -> 3" and added two slots).
        handlers: members.active(),
        queued: occupancy.queued,
        capacity: occupancy.capacity,
        rejected,
    })
}
