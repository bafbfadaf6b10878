//! The problem parsrv exists for: one handler stalls (SIGSTOP) with its queue full.
//! Plain SO_REUSEPORT keeps hashing connections to the full socket and they fail; parsrv
//! steers around it. Both run in the same test, against the same load.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use parsrv_integration_tests::{
    addr, group, http_load, privileged, signal, stop_process, HandlerKind, Needs, NetCounters,
    Outcome, PlainGroup,
};

const HANDLERS: usize = 4;
const BACKLOG: u32 = 8;
// The load the baseline was measured with: 20 clients x 20 connections, 3 s limit.
const CLIENTS: usize = 20;
const PER_CLIENT: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn stalled_handler_loses_no_connection_while_plain_reuseport_does() {
    privileged(Needs::program(), || {
        // --- parsrv ---
        let addr: SocketAddr = addr();
        let spawner = group("test-stall", HandlerKind::Http)
            .handlers(4)
            .backlog(8)
            .threads(2)
            .start();
        let stalled = spawner.handler_pid(0);
        stop_process(stalled);
        // Fill the stalled handler's queue to the kernel's "full" (BACKLOG + 1). Connections
        // the others accept are held too.
        let held = spawner.fill_queue(0, addr);
        assert_eq!(
            spawner.status().sockets[0].queue.unwrap().depth,
            BACKLOG + 1
        );

        let before = NetCounters::read();
        let counters_before = spawner.status().sockets[0].counters;
        let result = http_load(addr, CLIENTS, PER_CLIENT, TIMEOUT);
        let kernel = before.delta(&NetCounters::read());
        let status = spawner.status();
        let stalled_socket = status.sockets[0].counters;
        eprintln!(
            "parsrv: {} of {} requests failed, ListenOverflows +{}, {} redirected away from the stalled socket",
            result.failures(),
            result.outcomes.len(),
            kernel.listen_overflows,
            stalled_socket.redirected_away - counters_before.redirected_away,
        );
        assert_eq!(result.outcomes.len(), CLIENTS * PER_CLIENT);
        assert_eq!(result.failures(), 0, "{:?}", result.outcomes);
        assert_eq!(kernel.listen_overflows, 0, "{kernel:?}");
        assert_eq!(kernel.listen_drops, 0, "{kernel:?}");
        // The scenario really happened: the stalled socket was the hash choice of some of
        // these connections, and it took none of them.
        assert!(stalled_socket.redirected_away > counters_before.redirected_away);
        assert_eq!(stalled_socket.selected, counters_before.selected);
        assert_eq!(
            status.errors.total(),
            0,
            "fail-open errors: {:?}",
            status.errors
        );
        signal(stalled, Signal::SIGCONT);
        drop(held);
        assert!(spawner.stop().success());

        // --- control: plain SO_REUSEPORT, same shape, socket 0 never accepts ---
        let control_addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let plain = PlainGroup::start(control_addr, HANDLERS, BACKLOG as i32, &[1, 2, 3]);
        let before = NetCounters::read();
        let control = http_load(control_addr, CLIENTS, PER_CLIENT, TIMEOUT);
        let kernel = before.delta(&NetCounters::read());
        eprintln!(
            "plain SO_REUSEPORT: {} of {} requests failed ({} connect timeouts), ListenOverflows +{}",
            control.failures(),
            control.outcomes.len(),
            control.count(Outcome::ConnectTimeout),
            kernel.listen_overflows,
        );
        assert!(
            control.count(Outcome::ConnectTimeout) > 0,
            "{:?}",
            control.outcomes
        );
        assert!(kernel.listen_overflows > 0, "{kernel:?}");
        drop(plain);
    });
}
