//! Keeps the group as it was made, and warns about handlers that do not use it as given:
//! attaches the group's program again where someone replaced or detached it, puts back
//! sockets someone shut down, and warns (once per handler process) about a handler that
//! listens on a socket of its own, that changed the socket's queue length, or whose queue
//! never shrinks.

use std::{
    os::fd::AsFd,
    rc::Rc,
    time::{Duration, Instant},
};

use super::group::RunningGroup;
use crate::{
    dataplane::audit::{self, Audit},
    kernel,
    supervisor::process_stopped,
};

/// How often handlers are checked for serving outside their socket.
const WATCH_PERIOD: Duration = Duration::from_secs(2);
/// When the watchdog starts checking the group's program. Loading the audit iterator is a
/// burst of work (the kernel's BTF parsed, the program verified: 23 ms here, a few hundred
/// ms under emulation) that a spawner living a few seconds (the tests start hundreds) need
/// not pay, and an idle spawner's first seconds should stay quiet (`scaling` counts its
/// wake-ups). Handlers cannot touch the program meanwhile: their seccomp filter is there
/// from the first instruction.
const AUDIT_AFTER: Duration = Duration::from_secs(5);
/// How long a socket's queue may stay non-empty without ever shrinking before its handler
/// is reported as not accepting.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Checks the group's handlers every [`WATCH_PERIOD`] until the group stops.
pub(super) async fn watch(group: Rc<RunningGroup>) {
    // Per slot: since when its queue has not shrunk, and how deep it was.
    let mut stuck_since: Vec<Option<(Instant, u32)>> = Vec::new();
    let mut reported_in_range = std::collections::BTreeSet::new();
    let audited = !audit::turned_off();
    if !audited {
        let why = format!("turned off ({}=off)", audit::AUDIT_ENV);
        log::warn!(
            "group {}: its program is not audited: {why}",
            group.spec.name
        );
        group.audit_unavailable(&why);
    }
    let started = Instant::now();
    let mut audit_said = false;
    loop {
        tokio::time::sleep(WATCH_PERIOD).await;
        if audited && started.elapsed() >= AUDIT_AFTER {
            restore_program(&group, &mut audit_said).await;
        }
        heal_shut_down_sockets(&group).await;
        report_servers_in_range(&group, &mut reported_in_range);
        let members = group.members();
        stuck_since.resize(members.len() as usize, None);
        for (slot, (supervised, listener)) in members.pairs().enumerate() {
            let state = &supervised.state;
            let Some(pid) = state.borrow().pid else {
                stuck_since[slot] = None;
                continue;
            };
            if state.borrow().warned == Some(pid) {
                continue;
            }
            let inode = kernel::socket_inode(listener.socket().as_fd()).ok();
            let own = kernel::listening_sockets(pid)
                .into_iter()
                .find(|(found, _)| Some(*found) != inode);
            if let Some((_, addr)) = own {
                log::warn!(
                    "handler {slot} (pid {pid}) listens on {addr} itself instead of serving \
                     the socket parsrv passed as fd 3: its connections bypass the group; make \
                     it use fd 3 (LISTEN_FDS, as gunicorn does by itself; uvicorn --fd 3)"
                );
                state.borrow_mut().warned = Some(pid);
                continue;
            }
            let queue = listener.queue().unwrap_or_default();
            if queue.capacity != 0 && queue.capacity != listener.configured_capacity() {
                log::warn!(
                    "handler {slot} (pid {pid}) changed its socket's accept-queue length from {} \
                     to {} (it called listen() again with its own backlog): give the server the \
                     same backlog (e.g. uvicorn --backlog {}) so that --backlog holds",
                    listener.configured_capacity(),
                    queue.capacity,
                    group.spec.backlog
                );
                state.borrow_mut().warned = Some(pid);
                continue;
            }
            let depth = queue.depth;
            let stopped = process_stopped(pid);
            stuck_since[slot] = match stuck_since[slot] {
                _ if depth == 0 || stopped => None,
                Some((since, last)) if depth >= last => Some((since, depth)),
                _ => Some((Instant::now(), depth)),
            };
            if let Some((since, depth)) = stuck_since[slot] {
                if since.elapsed() >= STUCK_AFTER {
                    log::warn!(
                        "handler {slot} (pid {pid}) has not taken a connection from its socket \
                         in {STUCK_AFTER:?} ({depth} waiting): is it accepting on fd 3?"
                    );
                    state.borrow_mut().warned = Some(pid);
                }
            }
        }
    }
}

/// Attaches the group's program again to each address whose sockets run another or none
/// (see `RunningGroup::restore_program`), between two membership changes. A kernel that
/// cannot load the audit iterator is said once, in the log and the status.
async fn restore_program(group: &RunningGroup, said: &mut bool) {
    // Loaded (or refused) once per process, off the event loop; later checks only look.
    let loaded = match Audit::loaded() {
        Some(loaded) => loaded,
        None => match tokio::task::spawn_blocking(Audit::shared).await {
            Ok(loaded) => loaded,
            Err(_) => return,
        },
    };
    let audit = match loaded {
        Ok(audit) => audit,
        Err(why) => {
            if !std::mem::replace(said, true) {
                log::warn!(
                    "group {}: cannot check that its sockets keep its program: {why}",
                    group.spec.name
                );
                group.audit_unavailable(why);
            }
            return;
        }
    };
    let _changing = group.membership.lock().await;
    let mut audit = audit
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match group.restore_program(&mut audit) {
        Ok(restored) => {
            for what in restored {
                log::warn!(
                    "group {}: its sockets on {what} instead of the group's program (someone \
                     holding a socket replaced or detached it): attached the group's again",
                    group.spec.name
                );
            }
        }
        Err(e) => {
            if !std::mem::replace(said, true) {
                log::error!("group {}: checking its program: {e}", group.spec.name);
            }
        }
    }
}

/// Puts back in the group every socket a handler shut down (see
/// `Members::heal_shut_down`), between two membership changes.
async fn heal_shut_down_sockets(group: &RunningGroup) {
    let _changing = group.membership.lock().await;
    let slots = group.members().len();
    for slot in 0..slots {
        match group.heal_shut_down(slot) {
            Ok(true) => log::warn!(
                "group {}: the socket of slot {slot} was out of the group, shut down by its \
                 handler or left so by a spawner killed in the middle of a move: put back in \
                 the group",
                group.spec.name
            ),
            Ok(false) => {}
            Err(e) => log::error!("group {}: slot {slot}: {e}", group.spec.name),
        }
    }
}

/// Warns (once per socket) about a server that started listening inside the group's
/// prefix or port range after the group did: its bind succeeded, but the group's sk_lookup
/// program takes its connections. (One that listened before is refused at start.)
fn report_servers_in_range(group: &RunningGroup, reported: &mut std::collections::BTreeSet<u64>) {
    let ranges: Vec<&crate::spec::Listen> = group
        .spec
        .listen
        .iter()
        .filter(|e| !e.is_single())
        .collect();
    if ranges.is_empty() {
        return;
    }
    let Ok(listening) = crate::sock_diag::listening() else {
        return;
    };
    let ours: std::collections::BTreeSet<u64> = group
        .members()
        .listeners()
        .iter()
        .filter_map(|l| kernel::socket_inode(l.socket().as_fd()).ok())
        .collect();
    for socket in listening {
        if ours.contains(&socket.inode) || reported.contains(&socket.inode) {
            continue;
        }
        let at = crate::spec::Listen::single(socket.addr);
        if let Some(range) = ranges.iter().find(|r| r.overlaps(&at)) {
            reported.insert(socket.inode);
            log::warn!(
                "group {}: {} listens on {} inside --listen {range}: this group takes its \
                 connections; stop it or leave its address out of the range",
                group.spec.name,
                crate::sock_diag::owner_of(socket.inode)
                    .unwrap_or_else(|| format!("a process of uid {}", socket.uid)),
                socket.addr
            );
        }
    }
}
