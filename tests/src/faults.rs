//! Faults as operators meet them, shared by the tests and the benchmark: handlers SIGKILLed
//! at random under load ([`kill_loop`]), and a slot whose handler is never ready
//! ([`group_whose_slot_1_is_never_ready`]).

use std::time::Duration;

use nix::sys::signal::Signal;
use parsrv::{listeners::SocketState, status::GroupStatus};

use crate::{addr, example, group, wait_for, HandlerKind, Outcome, Spawner, SteadyLoad};

/// What a kill loop did and cost.
#[derive(Debug)]
pub struct KillLoop {
    pub kills: usize,
    pub requests: u64,
    pub failed: u64,
    /// Requests a handler had accepted and never answered: lost with a killed process
    /// (`accepted` of the handlers' shared counters, minus the answered).
    pub lost_in_flight: u64,
    /// Requests that never connected (timed out or refused).
    pub never_connected: usize,
    /// The kernel's counters over the loop: a migration that failed, or a SYN dropped on a
    /// full queue, would be a loss no kill explains.
    pub kernel: crate::NetCounters,
    /// Looks at a slot waiting out a restart delay while another had a handler.
    pub waiting: usize,
    /// Of those, how many found the slot's socket still in the group.
    pub waiting_in_the_group: usize,
    /// Connections the program sent to a socket while it was out of the group, or waiting
    /// for its handler, at two looks in a row (other slots had room all along).
    pub sent_while_not_serving: u64,
}

/// The load a kill loop runs under.
#[derive(Clone, Copy, Debug)]
pub enum KillLoad {
    /// `clients` closed-loop clients, until the loop ends.
    Steady { clients: usize },
    /// New connections at a fixed rate, answered or not ([`crate::OpenLoad`]), for as long
    /// as the kills go on.
    Open { per_second: u32 },
}

/// Which handler each kill of a storm takes: a fixed sequence (xorshift), so that runs
/// compare.
pub struct Victims(u32);

impl Victims {
    pub fn new() -> Victims {
        Victims(0x2545_f491)
    }

    /// The next victim's slot, of `handlers`.
    pub fn next(&mut self, handlers: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0 as usize % handlers
    }
}

impl Default for Victims {
    fn default() -> Self {
        Victims::new()
    }
}

/// SIGKILLs the handler of `slot` as `status` shows it; whether a process was killed. A
/// victim of the last kill may still be in the status the spawner sent (it had not yet
/// seen the death) and gone by now (reaped meanwhile): that is no kill.
pub fn kill_handler(status: &GroupStatus, slot: usize) -> bool {
    let Some(pid) = status.handlers[slot].pid else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => panic!("kill({pid}, SIGKILL): {e}"),
    }
}

/// Kills a random handler of `spawner`'s group (built-in handlers) every `every`, `kills`
/// times, under `load`; then waits for every handler to be back.
pub fn kill_loop(spawner: &Spawner, kills: usize, every: Duration, load: KillLoad) -> KillLoop {
    let handlers = spawner.status().handlers.len();
    let timeout = Duration::from_secs(3);
    // What the handlers had accepted before the load (the test's own requests, a
    // calibration): read before it starts, or its first connections count on both sides.
    let accepted_before = accepted_by_all(spawner);
    let load = match load {
        KillLoad::Steady { clients } => Load::Steady(SteadyLoad::start(
            addr(),
            clients,
            every * kills as u32 * 2 + Duration::from_secs(5),
            timeout,
        )),
        KillLoad::Open { per_second } => Load::Open(crate::OpenLoad::start(
            addr(),
            per_second,
            every * kills as u32,
            timeout,
        )),
    };
    let mut victims = Victims::new();
    let counters_before = crate::NetCounters::read();
    let mut result = KillLoop {
        kernel: crate::NetCounters::default(),
        kills: 0,
        requests: 0,
        failed: 0,
        lost_in_flight: 0,
        never_connected: 0,
        waiting: 0,
        waiting_in_the_group: 0,
        sent_while_not_serving: 0,
    };
    let mut previous: Option<GroupStatus> = None;
    for _ in 0..kills {
        std::thread::sleep(every);
        let victim = victims.next(handlers);
        let status = spawner.status();
        // Slots with a ready handler, to which a waiting slot leaves its connections.
        let live = status.handlers.iter().filter(|h| h.ready).count();
        for (handler, socket) in status.handlers.iter().zip(&status.sockets) {
            if handler.pid.is_none() && handler.restart_in_ms.is_some_and(|ms| ms > 0) && live > 0 {
                result.waiting += 1;
                result.waiting_in_the_group += usize::from(socket.state != SocketState::Parked);
            }
            // Not serving at both looks, the same process (or none) and no start in between:
            // the same spell.
            let before = previous.as_ref().map(|p| {
                (
                    &p.sockets[socket.slot as usize],
                    &p.handlers[socket.slot as usize],
                )
            });
            let not_serving = |s: &parsrv::status::SocketStatus| s.state != SocketState::Serving;
            let same_spell = |(b, h): &(
                &parsrv::status::SocketStatus,
                &parsrv::status::HandlerStatus,
            )| {
                not_serving(b)
                    && not_serving(socket)
                    && (h.restarts, h.pid) == (handler.restarts, handler.pid)
            };
            if let Some((before, _)) = before.filter(same_spell) {
                result.sent_while_not_serving +=
                    socket.counters.selected - before.counters.selected;
            }
        }
        result.kills += usize::from(kill_handler(&status, victim));
        previous = Some(status);
    }
    // The load goes on while the last victims come back, then stops.
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = match load {
        Load::Steady(load) => load.finish(),
        Load::Open(load) => load.finish(),
    };
    result.kernel = counters_before.delta(&crate::NetCounters::read());
    assert!(
        wait_for(Duration::from_secs(15), || spawner
            .status()
            .handlers
            .iter()
            .all(|h| h.alive)),
        "handlers did not come back:\n{}",
        spawner.log()
    );
    let accepted = accepted_by_all(spawner);
    let answered = outcomes.iter().filter(|o| **o == Outcome::Ok).count() as u64;
    result.requests = outcomes.len() as u64;
    result.failed = result.requests - answered;
    result.lost_in_flight = accepted - accepted_before - answered;
    result.never_connected = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::ConnectTimeout | Outcome::Refused))
        .count();
    result
}

/// Connections the group's built-in handlers counted as accepted so far, every slot.
fn accepted_by_all(spawner: &Spawner) -> u64 {
    spawner
        .status()
        .handlers
        .iter()
        .filter_map(|h| h.accepted)
        .sum()
}

enum Load {
    Steady(SteadyLoad),
    Open(crate::OpenLoad),
}

/// SIGKILL for process `pid` at its next `syscall`, made by its main thread: strace's fault
/// injection stops the thread at the call's entry and kills the process there, before the
/// kernel runs it. For a process killed at the worst moment of a sequence of calls (the
/// spawner between a move's shutdown and its listen()).
pub struct KillAtSyscall {
    strace: std::process::Child,
}

impl KillAtSyscall {
    /// Attaches to `pid` (returns once strace said so).
    pub fn arm(pid: u32, syscall: &str) -> KillAtSyscall {
        use std::io::BufRead as _;
        let mut strace = std::process::Command::new("strace")
            .args(["-p", &pid.to_string(), "-o", "/dev/null"])
            .args(["-e", &format!("trace={syscall}")])
            .args(["-e", &format!("inject={syscall}:signal=KILL")])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("needs strace: run `cargo xtask setup` (apt package strace)");
        let stderr = strace.stderr.take().expect("piped");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let attached = format!("Process {pid} attached");
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(first.contains(&attached), "strace: {first}");
        // The rest (its "killed by SIGKILL") is read to the end, so strace never blocks on
        // a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        KillAtSyscall { strace }
    }

    /// Waits up to `limit` for the kill; whether it happened.
    pub fn struck(&mut self, limit: Duration) -> bool {
        wait_for(limit, || matches!(self.strace.try_wait(), Ok(Some(_))))
    }
}

impl Drop for KillAtSyscall {
    fn drop(&mut self) {
        // Detaches from a process that is still alive (a test that failed before the call):
        // on SIGTERM strace lets it go on.
        let strace = nix::unistd::Pid::from_raw(self.strace.id() as i32);
        if let Ok(None) = self.strace.try_wait() {
            let _ = nix::sys::signal::kill(strace, Signal::SIGTERM);
        }
        let _ = self.strace.wait();
    }
}

/// Three exec handlers that are ready by the notify protocol: slots 0 and 2 run the blocking
/// example server (it says READY=1), slot 1 runs `slot_1` (a shell command) instead, which
/// never says it. Returns once slots 0 and 2 are ready.
pub fn group_whose_slot_1_is_never_ready(name: &str, slot_1: &str) -> Spawner {
    let script = format!(
        "if [ \"$PARSRV_SLOT\" = 1 ]; then {slot_1}; fi; exec {}",
        example("blocking_handler").display()
    );
    let spawner = group(name, HandlerKind::Exec)
        .handlers(3)
        .with(|g| g.notify = true)
        .command(&["sh", "-c", &script])
        .start_answering();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let handlers = spawner.status().handlers;
            handlers[0].ready && handlers[2].ready
        }),
        "{}",
        spawner.log()
    );
    spawner
}
