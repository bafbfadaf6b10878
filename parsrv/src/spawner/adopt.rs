//! Taking over a group whose spawner is gone: its handlers kept serving (nothing ties them
//! to the spawner), its program stayed attached to the sockets they hold, its maps stayed
//! pinned. From the [`GroupRecord`], each handler is opened by pidfd (refused if the pid
//! now names another process), and copies of its socket, counters page and output pipe
//! are taken from it with pidfd_getfd. A slot whose handler is gone lost its socket with
//! it (the kernel migrated its queue through the program); it gets a new socket and a new
//! handler.

use std::os::fd::{AsFd, OwnedFd};

use socket2::Socket;

use super::record::{GroupRecord, HandlerRecord};
use crate::{
    handler::{SharedStats, LISTEN_FD, OUTPUT_FD, STATS_FD},
    kernel,
    spec::HandlerKind,
    supervisor::{process_alive, AdoptedHandler, PidFd},
};

/// A group's surviving slots, taken over.
pub struct Adoption {
    pub record: GroupRecord,
    /// In slot order; `None` where the handler is gone.
    pub slots: Vec<Option<AdoptedSlot>>,
}

pub struct AdoptedSlot {
    /// The slot's socket (a copy of the handler's).
    pub socket: Socket,
    pub handler: AdoptedHandler,
}

impl Adoption {
    /// Takes over the live handlers of `record`'s group; `None` if none is left (then the
    /// record is stale: the group starts anew). Must run inside a tokio runtime.
    pub fn take(record: GroupRecord) -> Option<Adoption> {
        let kind = record.spec.handler;
        let slots: Vec<Option<AdoptedSlot>> = record
            .slots
            .iter()
            .enumerate()
            .map(|(slot, recorded)| {
                let handler = recorded.handler?;
                adopt_handler(&record.spec.name, slot, recorded.cookie, handler, kind)
                    .inspect_err(|why| {
                        log::warn!(
                            "group {}: handler {slot} (pid {}) not adopted: {why}; the slot starts anew",
                            record.spec.name,
                            handler.pid
                        )
                    })
                    .ok()
            })
            .collect();
        if slots.iter().all(Option::is_none) {
            return None;
        }
        Some(Adoption { record, slots })
    }

    /// Pids of the adopted handlers.
    pub fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .flatten()
            .map(|s| s.handler.process.pid())
            .collect()
    }
}

/// How long a handler that cannot be adopted is given to die of SIGKILL.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn adopt_handler(
    group: &str,
    slot: usize,
    cookie: u64,
    recorded: HandlerRecord,
    kind: HandlerKind,
) -> Result<AdoptedSlot, String> {
    let process = PidFd::open(recorded.pid, recorded.start_time).map_err(|e| e.to_string())?;
    if !process_alive(recorded.pid) {
        // Exited while no spawner ran, or during a re-exec: reap it if it is ours.
        return Err("it has exited".into());
    }
    if !crate::handler::shows_it_is(recorded.pid, group, slot) {
        return Err(format!(
            "pid {} does not show that it is this slot's handler (by its command line or \
             environment): left alone",
            recorded.pid
        ));
    }
    let socket = find_socket(&process, cookie).ok_or_else(|| {
        // Serving a socket parsrv cannot register would leave the program failing open for
        // it: it goes, and its slot starts anew. Gone before the group starts: alive (or a
        // zombie of this process after a re-exec), it kept its dynamic uid "in use" and the
        // group refused to start.
        let how = if process.kill_and_wait(KILL_WAIT) {
            "killed".to_owned()
        } else {
            format!("killed, but it had not exited {KILL_WAIT:?} later")
        };
        format!("slot {slot}'s socket (cookie {cookie}) is not among its fds: {how}")
    })?;
    let stats = (kind != HandlerKind::Exec)
        .then(|| process.get_fd(STATS_FD).and_then(SharedStats::map).ok())
        .flatten();
    let output = process.get_fd(OUTPUT_FD).ok();
    Ok(AdoptedSlot {
        socket,
        handler: AdoptedHandler {
            process,
            output,
            stats,
            restarts: recorded.restarts,
            ready: recorded.ready,
        },
    })
}

/// The handler's copy of the socket with `cookie`: fd 3 as parsrv passed it, else any fd
/// of the process (a server may have moved it).
fn find_socket(process: &PidFd, cookie: u64) -> Option<Socket> {
    let is_it = |fd: &OwnedFd| kernel::socket_cookie(fd.as_fd()).is_ok_and(|c| c == cookie);
    if let Ok(fd) = process.get_fd(LISTEN_FD) {
        if is_it(&fd) {
            return Some(Socket::from(fd));
        }
    }
    crate::procfs::fd_numbers(process.pid())
        .filter_map(|fd| process.get_fd(fd).ok())
        .find(is_it)
        .map(Socket::from)
}
