//! A SYN flood from spoofed sources never makes parsrv refuse or drop a client that the
//! kernel alone would serve. Under a flood every SYN queue is full of handshakes that never
//! complete, while the accept queues stay empty; the kernel answers real clients with
//! syncookies. The program refuses (`refuse`) or drops (`drop`) only when the accept
//! queues are full by the kernel's own test, never because of pending handshakes alone.
//!
//! Each run: a flood of 3000 spoofed SYNs/s takes hold (the kernel sends syncookies), then 4
//! clients make HTTP requests for 3 s; the same in the same test with a plain SO_REUSEPORT
//! group as the control.

use std::time::Duration;

use parsrv_integration_tests::{
    addr, flooded_load, group, privileged, HandlerKind, Needs, PlainGroup, Policy, WhenFull,
};

const FLOOD_PER_SECOND: u32 = 3000;
const LOAD_FOR: Duration = Duration::from_secs(3);
const HANDLERS: usize = 2;
const BACKLOG: u32 = 8;

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_syn_flood_never_makes_parsrv_refuse_a_client_the_kernel_serves() {
    privileged(Needs::program(), || {
        let mut runs = Vec::new();
        for policy in [Policy::Redirect, Policy::LeastLoaded] {
            for when_full in [WhenFull::Refuse, WhenFull::Drop] {
                let name = format!("flood-{policy}-{when_full}");
                let spawner = group(&name, HandlerKind::Http)
                    .handlers(HANDLERS as u32)
                    .backlog(BACKLOG)
                    .threads(2)
                    .policy(policy)
                    .when_full(when_full)
                    .start();
                let run = flooded_load(HANDLERS * BACKLOG as usize, FLOOD_PER_SECOND, LOAD_FOR);
                let status = spawner.status();
                let refused: u64 = status.sockets.iter().map(|s| s.counters.refused).sum();
                let dropped: u64 = status.sockets.iter().map(|s| s.counters.dropped).sum();
                eprintln!(
                    "{name}: {run:?}, program refused {refused}, dropped {dropped}, fail-open {}",
                    status.errors.total()
                );
                // The kernel defended itself as it would alone: its SYN queues overflowed
                // and it answered with syncookies (rather than parsrv turning SYNs away).
                assert!(
                    run.syncookies_sent > 0,
                    "{name}: no syncookie sent: {run:?}"
                );
                // No SYN was refused or dropped for want of room: the queues never filled
                // with connections, only with handshakes.
                assert_eq!((refused, dropped), (0, 0), "{name}");
                assert_eq!(status.errors.total(), 0, "{name}: {:?}", status.errors);
                assert!(spawner.stop().success());
                runs.push((name, run));
            }
        }
        // The control, after parsrv has let go of the address: plain SO_REUSEPORT, every socket served.
        let plain = PlainGroup::start(
            addr(),
            HANDLERS,
            BACKLOG as i32,
            &(0..HANDLERS).collect::<Vec<_>>(),
        );
        let control = flooded_load(HANDLERS * BACKLOG as usize, FLOOD_PER_SECOND, LOAD_FOR);
        drop(plain);
        eprintln!("control (plain SO_REUSEPORT): {control:?}");
        assert!(control.syncookies_sent > 0, "{control:?}");
        assert!(
            control.requests > 0 && control.spoofed_syns > 0,
            "{control:?}"
        );

        for (name, run) in &runs {
            assert!(
                run.failed <= control.failed,
                "{name}: {} of {} real clients failed ({:?}), the control {}",
                run.failed,
                run.requests,
                run.failures,
                control.failed
            );
        }
    });
}
