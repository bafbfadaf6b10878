//! The program's rare events reach the spawner's log: a socket parsrv did not register joins
//! the group (a stranger binds the port with SO_REUSEPORT as the same user, after parsrv
//! started); for each connection the kernel's hash gives that socket, the program fails open
//! (the kernel's choice serves it), counts it, and reports it (aya-log) at most once a second
//! per CPU.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use parsrv_integration_tests::{addr, group, privileged, wait_for, HandlerKind, Needs};

/// The log line of one report.
const REPORTED: &str = "the program failed open (unknown-socket:";

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn fail_open_errors_reach_the_log_at_most_once_a_second_per_cpu() {
    privileged(Needs::program(), || {
        let spawner = group("test-program-log", HandlerKind::Http)
            .handlers(2)
            .start();
        let stranger =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        stranger.set_reuse_port(true).unwrap();
        stranger.set_reuse_address(true).unwrap();
        stranger.bind(&addr().into()).unwrap();
        stranger.listen(1024).unwrap();
        let started = Instant::now();
        // The handshake completes in the kernel whoever accepts: connect and let go.
        for _ in 0..300 {
            drop(TcpStream::connect(addr()).unwrap());
        }
        assert!(
            wait_for(Duration::from_secs(10), || spawner.log().contains(REPORTED)),
            "no report in the log:\n{}",
            spawner.log()
        );
        let seconds = started.elapsed().as_secs() + 1;
        let errors = spawner.status().errors;
        let reports = spawner.log().matches(REPORTED).count() as u64;
        let cpus = std::thread::available_parallelism().unwrap().get() as u64;
        eprintln!(
            "{} unknown-socket errors counted, {reports} reported in {seconds} s on {cpus} CPUs",
            errors.unknown_socket
        );
        assert!(errors.unknown_socket > 0, "{errors:?}");
        assert_eq!(errors.total(), errors.unknown_socket, "{errors:?}");
        // Rate-limited: never more than once a second per CPU, so fewer than counted.
        assert!(
            reports <= cpus * (seconds + 1),
            "{reports} reports in {seconds} s"
        );
        assert!(
            reports < errors.unknown_socket,
            "every error was reported: {reports} of {}",
            errors.unknown_socket
        );
        drop(stranger);
        assert!(spawner.stop().success());
    });
}
