//! `overhead`: what steering costs against plain SO_REUSEPORT, told apart from this
//! machine's noise. Each comparison runs as interleaved pairs (reuseport then parsrv, then
//! parsrv then reuseport, ...), and the report gives the median of the per-pair ratios with
//! their spread, for throughput and for p99. Measured in the same runs, to say where a cost
//! goes: CPU time and context switches of the whole machine per connection (`perf stat -a`,
//! when perf is installed), the program's own run time (bpf_stats), and the spawner's
//! wake-ups, under load and idle.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Command,
    thread,
    time::Duration,
};

use nix::sys::socket::{getsockopt, sockopt};
use parsrv_integration_tests::context_switches;

use crate::{
    harness::{addr, seconds},
    load,
    models::{Model, Served},
    report::{Report, Table},
    stats::median,
};

/// What one run measured.
struct Sample {
    rate: f64,
    p99_ms: f64,
    /// Machine-wide CPU time per connection (µs) and context switches per connection.
    cpu_us_per_conn: Option<f64>,
    switches_per_conn: Option<f64>,
    /// parsrv only: the program's ns per run, and the spawner's wake-ups per second.
    program_ns: Option<f64>,
    spawner_wakeups: Option<f64>,
}

/// `perf stat -a` for `duration`: (task-clock ms, context switches) of the whole machine.
fn perf_stat(duration: Duration) -> Option<(f64, f64)> {
    let out = Command::new("perf")
        .args([
            "stat",
            "-a",
            "-x,",
            "-e",
            "task-clock,context-switches",
            "--",
        ])
        .arg("sleep")
        .arg(format!("{}", duration.as_secs_f64()))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let value = |event: &str| {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next()?.trim().parse::<f64>().ok())
    };
    Some((value("task-clock")?, value("context-switches")?))
}

fn run(model: Model, n: usize, duration: Duration) -> Sample {
    let served = Served::start(model, n, 128, addr());
    let spec = load::closed(2 * n, duration);
    // Warm up: every worker up and accepting.
    let _ = load::run(
        addr(),
        load::Spec {
            duration: Duration::from_millis(200),
            ..spec
        },
    );
    let spawner = served.spawner();
    let program_before = spawner.map(|s| s.status().program);
    let switches_before = spawner.map(|s| context_switches(s.pid()));
    let (outcome, perf) = thread::scope(|scope| {
        // Counted over the load's middle: its start and end are the harness's.
        let perf = scope.spawn(|| {
            thread::sleep(duration / 10);
            perf_stat(duration * 8 / 10)
        });
        let outcome = load::run(addr(), spec);
        (outcome, perf.join().unwrap())
    });
    let program = spawner.map(|s| s.status().program);
    let wakeups = spawner
        .zip(switches_before)
        .map(|(s, before)| (context_switches(s.pid()) - before) as f64 / duration.as_secs_f64());
    served.stop();
    let program_ns = program_before.zip(program).and_then(|(before, after)| {
        let runs = after.run_count - before.run_count;
        (runs > 0).then(|| (after.run_time_ns - before.run_time_ns) as f64 / runs as f64)
    });
    // The perf window is 8/10 of the load; the load's rate gives its connections.
    let connections = outcome.per_second() * duration.as_secs_f64() * 0.8;
    Sample {
        rate: outcome.per_second(),
        p99_ms: outcome.ms(0.99),
        cpu_us_per_conn: perf.map(|(ms, _)| ms * 1000.0 / connections),
        switches_per_conn: perf.map(|(_, cs)| cs / connections),
        program_ns,
        spawner_wakeups: wakeups,
    }
}

fn spread(values: &[f64]) -> String {
    crate::stats::spread(values, 3)
}

fn median_of(samples: &[Sample], field: fn(&Sample) -> Option<f64>, digits: usize) -> String {
    let values: Vec<f64> = samples.iter().filter_map(field).collect();
    if values.is_empty() {
        "-".into()
    } else {
        format!("{:.digits$}", median(values))
    }
}

pub fn overhead(report: &mut Report, quick: bool) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let _ = std::fs::write(STATS, "1");
    let sizes: &[usize] = if quick { &[2] } else { &[2, 4, 8, 16] };
    let pairs = if quick { 1 } else { 5 };
    let duration = seconds(quick, 3);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &n in sizes {
        let (mut plain, mut parsrv) = (Vec::new(), Vec::new());
        for pair in 0..pairs {
            let mut order = [Model::Reuseport, Model::ParsrvRedirect];
            if pair % 2 == 1 {
                order.reverse();
            }
            for model in order {
                let sample = run(model, n, duration);
                if model == Model::Reuseport {
                    plain.push(sample);
                } else {
                    parsrv.push(sample);
                }
            }
        }
        let rate: Vec<f64> = parsrv
            .iter()
            .zip(&plain)
            .map(|(p, r)| p.rate / r.rate)
            .collect();
        let p99: Vec<f64> = parsrv
            .iter()
            .zip(&plain)
            .map(|(p, r)| p.p99_ms / r.p99_ms)
            .collect();
        let rate_median = median(rate.clone());
        let p99_median = median(p99.clone());
        notes.push(format!(
            "N={n}: throughput {rate_median:.3}x (target >= 0.99: {}), p99 {p99_median:.3}x (target <= 1.05: {}).",
            if rate_median >= 0.99 { "met" } else { "NOT met" },
            if p99_median <= 1.05 { "met" } else { "NOT met" },
        ));
        rows.push(vec![
            n.to_string(),
            pairs.to_string(),
            spread(&rate),
            spread(&p99),
            format!(
                "{} / {}",
                median_of(&parsrv, |s| s.cpu_us_per_conn, 1),
                median_of(&plain, |s| s.cpu_us_per_conn, 1)
            ),
            format!(
                "{} / {}",
                median_of(&parsrv, |s| s.switches_per_conn, 2),
                median_of(&plain, |s| s.switches_per_conn, 2)
            ),
            median_of(&parsrv, |s| s.program_ns, 0),
            median_of(&parsrv, |s| s.spawner_wakeups, 0),
        ]);
    }
    // The spawner with nothing to do: its wake-ups per second.
    let served = Served::start(Model::ParsrvRedirect, 4, 128, addr());
    let idle = seconds(quick, 5);
    let pid = served.spawner().unwrap().pid();
    let before = context_switches(pid);
    thread::sleep(idle);
    let idle_wakeups = (context_switches(pid) - before) as f64 / idle.as_secs_f64();
    served.stop();
    notes.push(format!(
        "Idle (4 handlers, no connection, {idle:?}): the spawner woke {idle_wakeups:.0} times a second."
    ));
    report.table(
        &Table {
            name: "overhead",
            title: format!(
                "overhead: parsrv redirect against plain SO_REUSEPORT, {pairs} interleaved pairs of {duration:?} per size, closed loop, 2 clients per worker, a connection per request"
            ),
            columns: vec![
                "N",
                "pairs",
                "conn/s ratio median (min-max)",
                "p99 ratio median (min-max)",
                "CPU µs per connection, parsrv / reuseport",
                "context switches per connection, parsrv / reuseport",
                "program ns per run",
                "spawner wake-ups/s under load",
            ],
            rows,
        },
        &notes,
    );
    program_alone(report, quick);
    let _ = std::fs::write(STATS, was.trim());
}

/// A running spawner's program, taken off and put back on its group: through copies of the
/// spawner's own fds (pidfd_getfd), so that the very same handler processes serve with and
/// without it. What differs between the two is the program alone (and the kernel's call of
/// it), not the spawner, the handlers or how they were started.
struct ProgramSwitch {
    listener: OwnedFd,
    program: OwnedFd,
}

impl ProgramSwitch {
    fn of(spawner: u32) -> io::Result<ProgramSwitch> {
        // SAFETY: plain system calls; a returned fd is ours.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, spawner, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let copy = |fd: RawFd| -> io::Result<OwnedFd> {
            // SAFETY: as above.
            let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            if local < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh fd from pidfd_getfd.
            Ok(unsafe { OwnedFd::from_raw_fd(local as RawFd) })
        };
        let (mut listener, mut program) = (None, None);
        for entry in std::fs::read_dir(format!("/proc/{spawner}/fd"))?.flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if program.is_none() && target == "anon_inode:bpf-prog" {
                let info = std::fs::read_to_string(format!("/proc/{spawner}/fdinfo/{fd}"))?;
                // BPF_PROG_TYPE_SK_REUSEPORT
                if info
                    .lines()
                    .any(|l| l.split_whitespace().eq(["prog_type:", "21"]))
                {
                    program = Some(copy(fd)?);
                }
            } else if listener.is_none() && target.starts_with("socket:") {
                let socket = copy(fd)?;
                // A listening TCP socket of the group (not the control socket, a Unix one).
                if getsockopt(&socket, sockopt::AcceptConn).unwrap_or(false)
                    && getsockopt(&socket, sockopt::ReusePort).unwrap_or(false)
                {
                    listener = Some(socket);
                }
            }
        }
        match (listener, program) {
            (Some(listener), Some(program)) => Ok(ProgramSwitch { listener, program }),
            _ => Err(io::Error::other("no listener or no SK_REUSEPORT program")),
        }
    }

    /// Attaches the program to the group, or detaches whatever program it has.
    fn set(&self, attached: bool) -> io::Result<()> {
        let (option, value) = if attached {
            (libc::SO_ATTACH_REUSEPORT_EBPF, self.program.as_raw_fd())
        } else {
            (libc::SO_DETACH_REUSEPORT_BPF, 0)
        };
        // SAFETY: setsockopt on our copy of the listener with an int value.
        let rc = unsafe {
            libc::setsockopt(
                self.listener.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &value as *const RawFd as *const libc::c_void,
                std::mem::size_of::<RawFd>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let error = io::Error::last_os_error();
            // Detaching a group without a program: already as wanted.
            if attached || error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error);
            }
        }
        Ok(())
    }
}

/// One load run against a group as it is now: (conn/s, p99 ms, machine CPU ms, program ns
/// in total).
fn run_as_is(served: &Served, n: usize, duration: Duration) -> (f64, f64, Option<f64>, u64) {
    let spec = load::closed(2 * n, duration);
    let spawner = served.spawner().expect("a parsrv model");
    let before = spawner.status().program.run_time_ns;
    let (outcome, perf) = thread::scope(|scope| {
        let perf = scope.spawn(|| perf_stat(duration));
        let outcome = load::run(addr(), spec);
        (outcome, perf.join().unwrap())
    });
    let program_ns = spawner.status().program.run_time_ns - before;
    (
        outcome.per_second(),
        outcome.ms(0.99),
        perf.map(|(ms, _)| ms),
        program_ns,
    )
}

/// The program alone: the same handlers with the program attached and detached, in
/// interleaved pairs, and the program's share of the machine's CPU time.
fn program_alone(report: &mut Report, quick: bool) {
    let sizes: &[usize] = if quick { &[2] } else { &[2, 8, 16] };
    let pairs = if quick { 2 } else { 8 };
    let duration = seconds(quick, 3);
    let mut rows = Vec::new();
    for &n in sizes {
        // The watchdog would attach the detached program again: audit off for this one.
        let served = Served::start_with_env(
            Model::ParsrvRedirect,
            n,
            128,
            addr(),
            &[(parsrv::dataplane::audit::AUDIT_ENV, "off")],
        );
        let switch = ProgramSwitch::of(served.spawner().unwrap().pid())
            .expect("taking the spawner's program and listener");
        let _ = load::run(
            addr(),
            load::Spec {
                duration: Duration::from_millis(300),
                ..load::closed(2 * n, duration)
            },
        );
        let (mut rate, mut p99, mut share) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..pairs {
            let mut with = None;
            let mut without = None;
            let order = if pair % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for attached in order {
                switch
                    .set(attached)
                    .expect("attaching or detaching the program");
                let result = run_as_is(&served, n, duration);
                if attached {
                    if let (Some(cpu_ms), program_ns) = (result.2, result.3) {
                        share.push(program_ns as f64 / (cpu_ms * 1e6) * 100.0);
                    }
                    with = Some(result);
                } else {
                    assert_eq!(result.3, 0, "the program ran while detached");
                    without = Some(result);
                }
            }
            let (with, without) = (with.unwrap(), without.unwrap());
            rate.push(with.0 / without.0);
            p99.push(with.1 / without.1);
        }
        switch.set(true).expect("attaching the program back");
        served.stop();
        rows.push(vec![
            n.to_string(),
            pairs.to_string(),
            spread(&rate),
            spread(&p99),
            if share.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(share))
            },
        ]);
    }
    report.table(
        &Table {
            name: "program-alone",
            title: format!(
                "the program alone: the same parsrv handlers with the program attached / detached, {pairs} interleaved pairs of {duration:?}, closed loop, 2 clients per worker"
            ),
            columns: vec![
                "N",
                "pairs",
                "conn/s ratio median (min-max)",
                "p99 ratio median (min-max)",
                "program % of machine CPU (bpf_stats / perf task-clock)",
            ],
            rows,
        },
        &["Detached, the kernel's hash picks the socket, exactly as plain SO_REUSEPORT: a ratio below 1 is what running the program costs, told apart from the spawner and from how the handlers were started.".into()],
    );
}
