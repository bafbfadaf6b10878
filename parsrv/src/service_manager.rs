//! Telling a service manager how the spawner is doing, by systemd's notify protocol
//! (sd_notify: datagrams to `$NOTIFY_SOCKET`): `READY=1` once every group serves,
//! `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ requires) on SIGHUP and before
//! `parsrv upgrade` re-executes the binary, `STOPPING=1`, and `WATCHDOG=1` at half of
//! `WatchdogSec=`. Outside a service manager (no `NOTIFY_SOCKET`) each is a no-op.
//!
//! The watchdog pings come from the spawner's event loop itself: a spawner stuck there stops
//! pinging, systemd kills and restarts it (`Restart=`), and the new one adopts the groups.
//! None of these variables reaches a handler: handlers get a clean environment
//! (`spec::environment`).

use std::time::Duration;

use sd_notify::NotifyState;

/// The variables of the protocol (no handler gets them).
pub const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify the service manager ({states:?}): {e}");
    }
}

/// Every group serves.
pub fn ready(groups: usize) {
    let status = format!("serving {groups} groups");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Reloading (SIGHUP) or re-executing (`parsrv upgrade`): `ready` follows.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => log::warn!("cannot read CLOCK_MONOTONIC for the service manager: {e}"),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Pings the service manager's watchdog at half its interval, forever (run inside the
/// spawner's LocalSet); returns at once when no watchdog is set.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    log::info!("service manager watchdog: every {interval:?}; pinging at half that");
    let mut ticks = tokio::time::interval((interval / 2).max(Duration::from_millis(1)));
    // After a stall, one ping, not a burst of the missed ones: the stall is what the
    // watchdog is for.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}
