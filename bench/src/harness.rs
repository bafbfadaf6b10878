//! What the scenarios run on: the address every model serves on, how long a run lasts, and
//! one measured run of a model under load.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use parsrv_integration_tests::NetCounters;

use crate::{
    load::{self, Spec},
    models::{Model, Served},
    stats::deltas,
};

/// No client of the lifecycle scenarios runs longer than this, whatever happens.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

pub fn addr() -> SocketAddr {
    "127.0.0.1:8080".parse().unwrap()
}

pub fn seconds(quick: bool, full: u64) -> Duration {
    if quick {
        Duration::from_millis(800)
    } else {
        Duration::from_secs(full)
    }
}

/// Serves `model` with `workers`, runs `spec` against it; returns the load's outcome and what
/// each worker accepted meanwhile.
pub fn measure(
    model: Model,
    workers: usize,
    backlog: u32,
    spec: Spec,
    during: impl FnOnce(&Served) + Send,
) -> (load::Outcome, Vec<u64>, NetCounters) {
    let served = Served::start(model, workers, backlog, addr());
    // Warm up: every worker up and accepting.
    let _ = load::run(
        addr(),
        Spec {
            duration: Duration::from_millis(200),
            ..spec
        },
    );
    let before = served.accepted();
    let kernel = NetCounters::read();
    let outcome = thread::scope(|scope| {
        let running = scope.spawn(|| load::run(addr(), spec));
        during(&served);
        running.join().unwrap()
    });
    let kernel = kernel.delta(&NetCounters::read());
    let accepted = deltas(&served.accepted(), &before);
    served.stop();
    (outcome, accepted, kernel)
}

/// Makes process `pid` ten times slower for `duration`: it runs 1 ms in every 10 (SIGSTOP,
/// 9 ms, SIGCONT, 1 ms).
pub fn slow_down(pid: u32, duration: Duration) {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        parsrv_integration_tests::signal(pid, nix::sys::signal::Signal::SIGSTOP);
        thread::sleep(Duration::from_millis(9));
        parsrv_integration_tests::signal(pid, nix::sys::signal::Signal::SIGCONT);
        thread::sleep(Duration::from_millis(1));
    }
}
