//! The monitoring endpoint (`--metrics`) as monitoring meets it: idle and slow clients do not
//! keep a scrape out, `/status` is the `status --json` array, and `/healthz` tells a load
//! balancer whether every group serves (200) or not (503: draining, no live handler).

use std::{net::TcpStream, time::Duration};

use nix::sys::signal::Signal;
use parsrv::status::GroupStatus;
use parsrv_integration_tests::{
    addr, get_page, group, privileged, signal, stop_handler_group, wait_for, HandlerKind, Needs,
};

const METRICS: &str = "127.0.0.1:9100";
/// Idle connections held open to the endpoint while it must still answer.
const IDLE: usize = 200;

/// `GET path` from the endpoint with `timeout` for each step.
fn get(path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    get_page(METRICS.parse().unwrap(), path, timeout)
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn idle_clients_do_not_block_a_scrape_and_status_and_health_answer() {
    privileged(Needs::program(), || {
        let spawner = group("test-metrics", HandlerKind::Http)
            .handlers(2)
            .metrics(METRICS)
            .start();
        // Clients that connect and say nothing, as a port scanner or a stuck proxy would.
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| TcpStream::connect(METRICS).unwrap())
            .collect();
        let (code, text) = get("/metrics", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("no scrape within 1 s with {IDLE} idle clients: {e}"));
        assert_eq!(code, 200, "{text}");
        assert!(
            text.contains("parsrv_group_handlers{group=\"test-metrics\"} 2\n"),
            "{text}"
        );
        let (code, json) = get("/status", Duration::from_secs(1)).unwrap();
        assert_eq!(code, 200, "{json}");
        let statuses: Vec<GroupStatus> = serde_json::from_str(&json).unwrap();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].spec, spawner.status().spec);
        assert_eq!(
            get("/healthz", Duration::from_secs(1)).unwrap(),
            (200, "ok: 1 group(s) serve\n".into())
        );
        assert_eq!(get("/nowhere", Duration::from_secs(1)).unwrap().0, 404);
        drop(idle);
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn health_is_503_while_a_group_drains_or_has_no_live_handler() {
    privileged(Needs::program(), || {
        // No live handler: a program that exits at once, over and over.
        let spawner = group("test-health-dead", HandlerKind::Exec)
            .handlers(1)
            .command(&["sh", "-c", "exit 3"])
            .metrics(METRICS)
            .start_answering();
        assert!(
            wait_for(Duration::from_secs(10), || get(
                "/healthz",
                Duration::from_secs(1)
            )
            .is_ok_and(
                |answer| answer == (503, "group test-health-dead has no live handler\n".into())
            )),
            "{}",
            spawner.log()
        );
        assert!(spawner.stop().success());

        // Draining: a stopped handler keeps a connection queued, so the drain lasts its
        // grace period; the endpoint answers all along.
        let spawner = group("test-health-drain", HandlerKind::Http)
            .handlers(1)
            .drain()
            .grace(5.0)
            .metrics(METRICS)
            .start();
        assert_eq!(get("/healthz", Duration::from_secs(1)).unwrap().0, 200);
        stop_handler_group(spawner.handler_pid(0));
        let _queued = TcpStream::connect(addr()).unwrap();
        signal(spawner.pid(), Signal::SIGTERM);
        assert!(
            wait_for(Duration::from_secs(5), || get(
                "/healthz",
                Duration::from_secs(1)
            )
            .is_ok_and(
                |answer| answer == (503, "group test-health-drain is draining\n".into())
            )),
            "{}",
            spawner.log()
        );
        assert!(spawner.stop().success());
    });
}
