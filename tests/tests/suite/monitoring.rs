//! The monitoring endpoint (`--metrics`) as monitoring meets it: idle and slow clients do not
//! keep a scrape out, `/status` is the `status --json` array, and `/healthz` tells a load
//! balancer whether every group serves (200) or not (503: draining, no live handler).

use std::{net::TcpStream, time::Duration};

use nix::sys::signal::Signal;
use parsrv::status::GroupStatus;
use parsrv_integration_tests::{
    addr, get_page_from, group, privileged, signal, stop_handler_group, wait_for, HandlerKind,
    Needs,
};

/// Raises this test process's soft limit on open files to its hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur as usize > IDLE + 64,
        "fd limit {}",
        limit.rlim_cur
    );
}

const METRICS: &str = "127.0.0.1:9100";
/// Idle connections held open to the endpoint, from one address, while it must still
/// answer others: one more than it serves at once in all.
const IDLE: usize = parsrv::metrics::MAX_CONNECTIONS + 1;
/// Where the idle clients connect from; Prometheus and the load balancer come from
/// [`MONITOR`].
const IDLER: &str = "127.0.0.1";
const MONITOR: &str = "127.0.0.2";

/// `GET path` from the endpoint with `timeout` for each step, from [`MONITOR`].
fn get(path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    get_page_from(
        Some(MONITOR.parse().unwrap()),
        METRICS.parse().unwrap(),
        path,
        timeout,
    )
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn idle_clients_do_not_block_a_scrape_and_status_and_health_answer() {
    privileged(Needs::program(), || {
        let spawner = group("test-metrics", HandlerKind::Http)
            .handlers(2)
            .metrics(METRICS)
            .start();
        // Connections that say nothing, as a port scanner, a stuck proxy or an attacker's
        // slow client would, more than the endpoint serves at once. Its fds: the test
        // process's soft limit is raised for them.
        raise_fd_limit();
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket
                    .bind(&std::net::SocketAddr::new(IDLER.parse().unwrap(), 0).into())
                    .unwrap();
                socket
                    .connect(&METRICS.parse::<std::net::SocketAddr>().unwrap().into())
                    .unwrap();
                socket.into()
            })
            .collect();
        // Past its share, the idler's connections are closed at once.
        let mut last = &idle[IDLE - 1];
        last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut last, &mut byte).unwrap_or(0),
            0,
            "the endpoint kept connection {IDLE} of one client open"
        );
        let (code, text) = get("/metrics", Duration::from_secs(1)).unwrap_or_else(|e| {
            panic!("no scrape within 1 s with {IDLE} idle connections from {IDLER}: {e}")
        });
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
        // Control: the idler itself gets nothing more while its share is taken.
        let refused = get_page_from(
            Some(IDLER.parse().unwrap()),
            METRICS.parse().unwrap(),
            "/healthz",
            Duration::from_secs(2),
        );
        assert!(
            refused.as_ref().is_err() || refused.as_ref().unwrap().0 == 0,
            "{refused:?}"
        );
        drop(idle);
        // Once it lets go, it is served again.
        assert!(wait_for(Duration::from_secs(5), || get_page_from(
            Some(IDLER.parse().unwrap()),
            METRICS.parse().unwrap(),
            "/healthz",
            Duration::from_secs(1)
        )
        .is_ok_and(|(code, _)| code == 200)));
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
