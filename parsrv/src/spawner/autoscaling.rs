//! The autoscaler's loop (`--handlers MIN..MAX`): samples the group and applies the
//! decisions of the policy in [`crate::autoscale`].

use std::{rc::Rc, time::Instant};

use super::group::RunningGroup;
use crate::autoscale::{self, Autoscaler, Sample};

/// Samples the group every [`autoscale::SAMPLE_EVERY`] and applies the policy's decisions.
pub(super) async fn run(group: Rc<RunningGroup>) {
    let mut scaler = Autoscaler::new(group.spec.handlers.min, group.spec.handlers.max);
    let mut ticker = tokio::time::interval(autoscale::SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let Some(sample) = sample(&group) else {
            continue;
        };
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
    let handlers = members.len();
    let occupancy = members.occupancy();
    let counters = members.steering().slot_counters(handlers).ok()?;
    Some(Sample {
        at: Instant::now(),
        handlers,
        queued: occupancy.queued,
        capacity: occupancy.capacity,
        rejected: counters.iter().map(|c| c.dropped + c.refused).sum(),
    })
}
