//! Every socket full: `--when-full drop` drops SYNs silently (the client retransmits and the
//! program runs again for each retransmission), `--when-full refuse` answers with a RST at
//! once. parsrv's counters equal what the kernel counted.

use std::{net::SocketAddr, time::Duration};

use parsrv_integration_tests::{
    addr, connect, group, privileged, stop_process, wait_for, HandlerKind, Needs, NetCounters,
    Outcome, Spawner, WhenFull,
};

const ATTEMPTS: usize = 4;

/// Starts a group of 2 stalled handlers (backlog 2) with their queues full.
fn full_group(name: &str, when_full: WhenFull) -> (Spawner, Vec<std::net::TcpStream>) {
    let spawner = group(name, HandlerKind::Echo)
        .handlers(2)
        .backlog(2)
        .when_full(when_full)
        // Stall detection off: stopped handlers are how this test fills the queues.
        .stopped_handlers_keep_their_share()
        .start();
    for slot in 0..2 {
        stop_process(spawner.handler_pid(slot));
    }
    let addr: SocketAddr = addr();
    let mut held = Vec::new();
    // 2 sockets x (backlog + 1): six connections fill the group.
    for _ in 0..6 {
        held.push(connect(addr, Duration::from_secs(2)).expect("room left"));
    }
    assert!(wait_for(Duration::from_secs(2), || spawner
        .status()
        .sockets
        .iter()
        .all(|s| s.queue.unwrap().depth == 3)));
    (spawner, held)
}

fn totals(spawner: &Spawner) -> (u64, u64) {
    let status = spawner.status();
    (
        status.sockets.iter().map(|s| s.counters.dropped).sum(),
        status.sockets.iter().map(|s| s.counters.refused).sum(),
    )
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn when_full_drop_times_out_and_refuse_resets_counted_like_the_kernel() {
    privileged(Needs::program(), || {
        let addr: SocketAddr = addr();

        // drop: each attempt times out; within 1.5 s the client sends its SYN and one
        // retransmission (1 s later), and both are steered and dropped.
        let (spawner, held) = full_group("test-full-drop", WhenFull::Drop);
        let (dropped_before, _) = totals(&spawner);
        let before = NetCounters::read();
        for _ in 0..ATTEMPTS {
            assert_eq!(
                connect(addr, Duration::from_millis(1500)).unwrap_err(),
                Outcome::ConnectTimeout
            );
        }
        let kernel = before.delta(&NetCounters::read());
        let dropped = totals(&spawner).0 - dropped_before;
        eprintln!(
            "drop: {ATTEMPTS} attempts, parsrv dropped {dropped}, ListenOverflows +{}",
            kernel.listen_overflows
        );
        assert_eq!(dropped, kernel.listen_overflows, "{kernel:?}");
        assert!(
            dropped >= 2 * ATTEMPTS as u64,
            "retransmissions were not steered again"
        );
        assert_eq!(kernel.out_rsts, 0);
        drop(held);
        assert!(spawner.stop().success());

        // refuse: each attempt is refused at once, one RST each.
        let (spawner, held) = full_group("test-full-refuse", WhenFull::Refuse);
        let (_, refused_before) = totals(&spawner);
        let before = NetCounters::read();
        for _ in 0..ATTEMPTS {
            assert_eq!(
                connect(addr, Duration::from_millis(1500)).unwrap_err(),
                Outcome::Refused
            );
        }
        let kernel = before.delta(&NetCounters::read());
        let refused = totals(&spawner).1 - refused_before;
        eprintln!(
            "refuse: {ATTEMPTS} attempts, parsrv refused {refused}, TcpOutRsts +{}",
            kernel.out_rsts
        );
        assert_eq!(refused, ATTEMPTS as u64);
        assert_eq!(kernel.out_rsts, refused, "{kernel:?}");
        assert_eq!(kernel.listen_overflows, 0, "{kernel:?}");
        drop(held);
        assert!(spawner.stop().success());
    });
}
