//! A real DNS server and a real DNS load tool, from Debian, for the UDP tests: Unbound
//! ([`unbound`]), which takes its UDP socket by systemd's socket activation, and dnsperf,
//! which sends queries at a set rate from many clients and counts the answers.
//!
//! Unbound uses an inherited socket only where `sd_booted()` says systemd runs (it looks for
//! `/run/systemd/system`); elsewhere it binds a socket of its own. Each test has an empty
//! /run of its own (see [`crate::privileged`]), so [`as_if_systemd_ran`] makes that
//! directory there, for the test's processes alone.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Unbound's binary, unpacked from Debian's package by `cargo xtask setup` into the
/// workspace's `target/test-tools/unbound` (installing the package would also start and
/// enable a system resolver on a machine with systemd, which the tests do not need).
pub fn unbound() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/unbound/usr/sbin/unbound")
}
pub const DNSPERF: &str = "/usr/bin/dnsperf";
/// The one name the test zone answers, and its address.
pub const QUERY: &str = "a.test A";

/// Makes `sd_booted()` true for the processes of this test's mount namespace.
pub fn as_if_systemd_ran() {
    std::fs::create_dir_all("/run/systemd/system").expect("mkdir /run/systemd/system");
}

/// Writes an Unbound configuration into `dir` that answers `a.test` from a local zone (no
/// query leaves the host), in the foreground, logging to stderr, one thread, UDP on
/// 127.0.0.1 only. `own_socket`: it binds `port` itself, with SO_REUSEPORT (the plain
/// control), and a receive buffer of `receive_buffer` bytes if given (`so-rcvbuf`);
/// otherwise it takes the socket it is handed (`use-systemd`), and a bind of its own would
/// fail (parsrv's UDP sockets have no SO_REUSEADDR, and `so-reuseport: no`).
pub fn unbound_config(
    dir: &Path,
    port: u16,
    own_socket: bool,
    receive_buffer: Option<usize>,
) -> PathBuf {
    let path = dir.join(match (own_socket, receive_buffer) {
        (false, _) => "unbound-activated.conf".to_string(),
        (true, None) => "unbound-plain.conf".to_string(),
        (true, Some(size)) => format!("unbound-plain-{size}.conf"),
    });
    let reuseport = if own_socket { "yes" } else { "no" };
    let buffer = receive_buffer.map_or(String::new(), |size| format!("    so-rcvbuf: {size}\n"));
    let text = format!(
        r#"server:
    use-systemd: yes
    do-daemonize: no
    interface: 127.0.0.1
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: no
    so-reuseport: {reuseport}
{buffer}    num-threads: 1
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    local-zone: "test." static
    local-data: "a.test. 60 IN A 192.0.2.1"
remote-control:
    control-enable: no
"#,
        dir = dir.display()
    );
    std::fs::write(&path, text).expect("writing the unbound configuration");
    path
}

/// Unbound processes the test started itself (the plain control), killed by pid when
/// dropped.
pub struct PlainUnbound {
    pub servers: Vec<Child>,
}

impl PlainUnbound {
    /// Starts an Unbound server per configuration (each binding its port with SO_REUSEPORT),
    /// and returns once each says it serves (bounded: 20 s each).
    pub fn start(configs: &[PathBuf]) -> PlainUnbound {
        let mut plain = PlainUnbound {
            servers: Vec::new(),
        };
        for config in configs {
            let mut child = Command::new(unbound())
                .args(["-d", "-p", "-c"])
                .arg(config)
                .env_remove("NOTIFY_SOCKET")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "starting {}: {e} (`cargo xtask setup` unpacks it)",
                        unbound().display()
                    )
                });
            let stderr = child.stderr.take().unwrap();
            plain.servers.push(child);
            let (said, told) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut serving = false;
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if !serving && line.contains("start of service") {
                        serving = true;
                        let _ = said.send(Ok(()));
                    }
                    if !serving && line.contains("error") {
                        let _ = said.send(Err(line));
                    }
                }
            });
            match told.recv_timeout(Duration::from_secs(20)) {
                Ok(Ok(())) => {}
                Ok(Err(line)) => panic!("unbound did not start: {line}"),
                Err(_) => panic!("unbound did not say it serves within 20 s"),
            }
        }
        plain
    }

    pub fn pid(&self, index: usize) -> u32 {
        self.servers[index].id()
    }
}

impl Drop for PlainUnbound {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// What dnsperf counted: queries sent, answered, and lost (no answer within its time-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsperfCounts {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
}

/// dnsperf, running: `queries` queries for `a.test` to `addr` at most `rate` a second (no
/// cap on queries outstanding, so it does not slow down with the servers: open loop), from
/// `clients` client sockets (each its own 4-tuple), each query given `timeout` to be
/// answered.
pub struct Dnsperf {
    child: Child,
    started: Instant,
}

impl Dnsperf {
    pub fn start(
        dir: &Path,
        addr: SocketAddr,
        queries: u64,
        rate: u64,
        clients: u32,
        timeout: Duration,
    ) -> Dnsperf {
        let input = dir.join("dnsperf-queries.txt");
        std::fs::write(&input, format!("{QUERY}\n")).unwrap();
        let child = Command::new(DNSPERF)
            .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .arg("-d")
            .arg(&input)
            // Passes over the one-line input: one query each.
            .args(["-n", &queries.to_string()])
            .args(["-Q", &rate.to_string()])
            .args(["-q", &queries.to_string()])
            .args(["-c", &clients.to_string()])
            .args(["-t", &timeout.as_secs().max(1).to_string()])
            // Each answer's latency, one line each (`> NOERROR a.test A 0.000212`).
            .arg("-v")
            .arg("-W")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dnsperf");
        Dnsperf {
            child,
            started: Instant::now(),
        }
    }

    /// Waits for dnsperf to end (at most `within` after its start: then it is killed and the
    /// test fails) and returns its counts, each answer's latency (sorted), and its output
    /// for messages (without the line of each answer).
    pub fn finish(mut self, within: Duration) -> (DnsperfCounts, Vec<Duration>, String) {
        loop {
            if self
                .child
                .try_wait()
                .expect("waiting for dnsperf")
                .is_some()
            {
                break;
            }
            if self.started.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("dnsperf ran for more than {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = self.child.wait_with_output().expect("dnsperf's output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "dnsperf failed: {text}");
        let summary: String = text
            .lines()
            .filter(|l| !l.starts_with("> "))
            .map(|l| format!("{l}\n"))
            .collect();
        (
            parse_dnsperf(&text).unwrap_or_else(|| panic!("{summary}")),
            latencies(&text),
            summary,
        )
    }
}

/// The latency of each answered query in dnsperf's verbose output (`> RCODE QUERY
/// SECONDS`; a time-out, `> T ...`, has none), sorted.
pub fn latencies(output: &str) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("> ")?;
            if rest.starts_with("T ") {
                return None;
            }
            let seconds: f64 = rest.split_whitespace().last()?.parse().ok()?;
            Some(Duration::from_secs_f64(seconds))
        })
        .collect();
    latencies.sort();
    latencies
}

/// The `p`-th percentile (0 to 100) of `sorted` by the nearest-rank method; None if empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The counts in dnsperf's "Statistics:" block (`  Queries sent:         2000`, ...).
pub fn parse_dnsperf(output: &str) -> Option<DnsperfCounts> {
    let count = |label: &str| -> Option<u64> {
        output.lines().find_map(|line| {
            let rest = line.trim_start().strip_prefix(label)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    Some(DnsperfCounts {
        sent: count("Queries sent:")?,
        completed: count("Queries completed:")?,
        lost: count("Queries lost:")?,
    })
}

/// dnsperf's load: 2,000 queries for one name from 200 clients (each its own 4-tuple) at
/// 5,000 a second, each given 10 s to be answered.
pub const DNS_QUERIES: u64 = 2000;
pub const DNS_RATE: u64 = 5000;
pub const DNS_CLIENTS: u32 = 200;
pub const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// A UDP group of `handlers` Unbound servers as exec handlers on `addr` (socket activation,
/// READY=1 by notify), each with `config` (an [`unbound_config`] that takes its socket).
pub fn unbound_group(
    name: &str,
    addr: SocketAddr,
    handlers: u32,
    config: &Path,
) -> crate::GroupBuilder {
    crate::group(name, parsrv::spec::HandlerKind::Exec)
        .listen(&format!("udp://{addr}"))
        .handlers(handlers)
        .with(|g| g.notify = true)
        .command(&[
            unbound().to_str().unwrap(),
            "-d",
            "-p",
            "-c",
            config.to_str().unwrap(),
        ])
}

/// Gives the socket of a group's handler `pid` (its fd 3) a receive buffer of `bytes`
/// (SO_RCVBUF: the kernel doubles it), as a plain server's `so-rcvbuf` would.
pub fn set_handler_buffer(pid: u32, bytes: usize) {
    let socket = crate::fd_of_process(pid, 3).unwrap();
    socket2::SockRef::from(&socket)
        .set_recv_buffer_size(bytes)
        .unwrap();
}

/// Runs dnsperf (`queries` of them) against `addr` while `stopped` is stopped, and continues it once the run has
/// gone quiet (dnsperf sent everything and the others answered what they got), well within
/// the queries' time-out, so that what its buffer held is answered, not lost: what is lost
/// is what the kernel dropped. dnsperf's counts, the namespace's UDP counters over the run,
/// and dnsperf's output.
pub fn dnsperf_with_one_stopped(
    dir: &Path,
    addr: SocketAddr,
    queries: u64,
    stopped: u32,
) -> (DnsperfCounts, crate::UdpCounters, Vec<Duration>, String) {
    crate::stop_process(stopped);
    let before = crate::UdpCounters::read();
    let load = Dnsperf::start(dir, addr, queries, DNS_RATE, DNS_CLIENTS, DNS_TIMEOUT);
    // Sending takes DNS_QUERIES / DNS_RATE = 0.4 s here; in an emulated VM longer, and
    // dnsperf itself can take a second to start there (a CI run's control lost nothing:
    // the stopped server was continued before the first query). Quiet: the namespace's UDP
    // counters unchanged for 300 ms, once they show at least as many datagrams read or
    // dropped as queries were sent (an answered query is read twice: by the server, and
    // by dnsperf). Bounded: 30 s.
    let started = Instant::now();
    let mut last = crate::UdpCounters::read();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        let now = crate::UdpCounters::read();
        let seen = before.delta(&now);
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        } else if quiet_since.elapsed() >= Duration::from_millis(300)
            && seen.in_datagrams + seen.rcvbuf_errors >= queries
        {
            break;
        }
    }
    crate::signal(stopped, nix::sys::signal::Signal::SIGCONT);
    let (counts, latencies, output) = load.finish(Duration::from_secs(60));
    (
        counts,
        before.delta(&crate::UdpCounters::read()),
        latencies,
        output,
    )
}

/// "answered N, p50 X ms, p99 Y ms" of one dnsperf run, for the figures.
pub fn answered_and_latency(counts: &DnsperfCounts, latencies: &[Duration]) -> String {
    let ms = |p: f64| {
        percentile(latencies, p).map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
    };
    format!(
        "answered {} of {}, latency p50 {} ms, p99 {} ms",
        counts.completed,
        counts.sent,
        ms(50.0),
        ms(99.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_latencies_are_read_and_ranked() {
        let output = "[Status] Sending queries\n> NOERROR a.test A 0.000212\n> T a.test A\n\
                      > NOERROR a.test A 0.000120\n> SERVFAIL a.test A 0.5\nStatistics:\n";
        let sorted = latencies(output);
        assert_eq!(
            sorted,
            [
                Duration::from_micros(120),
                Duration::from_micros(212),
                Duration::from_millis(500)
            ]
        );
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_micros(212)));
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_millis(500)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_micros(120)));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn dnsperf_statistics_are_read() {
        let output = "Statistics:\n\n  Queries sent:         2000\n  Queries completed:    1990 (99.50%)\n  Queries lost:         10 (0.50%)\n\n  Run time (s):         1.000000\n";
        assert_eq!(
            parse_dnsperf(output),
            Some(DnsperfCounts {
                sent: 2000,
                completed: 1990,
                lost: 10
            })
        );
        assert_eq!(parse_dnsperf("Statistics:\n  Queries sent: 5\n"), None);
    }
}
