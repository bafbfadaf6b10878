//! The table `parsrv status` prints for a group: its settings, a row per slot with its
//! handler, queue and counters, then its addresses, dispatch table and program.

use std::fmt::Write as _;

use parsrv_common::{
    lookup::AddressCounters,
    reuseport::{affinity::AffinityCounters, GlobalCounters, SlotCounters},
    udp::{UdpErrors, UdpSlotCounters},
};

use super::GroupStatus;
use crate::listeners::SocketState;

impl GroupStatus {
    /// Human-readable form.
    pub fn render(&self) -> String {
        if self.spec.is_udp() {
            return self.render_datagrams();
        }
        let spec = &self.spec;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "group {}  listen {}  policy {}  when-full {}  backlog {}  handler {} x{} threads  spawner pid {}",
            spec.name,
            spec.listen_text(),
            spec.policy,
            spec.when_full,
            spec.backlog,
            spec.handler,
            spec.threads,
            self.spawner_pid
        );
        if !spec.command.is_empty() {
            let _ = writeln!(out, "command: {}", spec.command.join(" "));
        }
        if let Some(user) = &spec.user {
            let _ = writeln!(out, "handlers run as: {user}");
        }
        if spec.autoscaled() {
            let _ = writeln!(
                out,
                "autoscaled {}: {} handlers now, {} resizes{}",
                spec.handlers,
                self.handlers.len(),
                self.scaling.decisions,
                self.scaling
                    .last_decision
                    .as_ref()
                    .map_or(String::new(), |d| format!(", last {d}"))
            );
        }
        if self.draining {
            let _ = writeln!(
                out,
                "draining: new connections are refused until the queues are empty"
            );
        }
        let _ = write!(
            out,
            "{:>4} {:>8} {:>5} {:>3} {:>8} {:>11}",
            "slot", "pid", "alive", "cpu", "restarts", "queue/max"
        );
        for counter in SlotCounters::COUNTERS {
            let _ = write!(
                out,
                " {:>w$}",
                counter.column,
                w = column_width(counter.column)
            );
        }
        let _ = writeln!(out, " {:>9} {:>10}", "accepted", "lost-races");
        for (handler, socket) in self.handlers.iter().zip(&self.sockets) {
            let pid = handler.pid.map_or("-".to_string(), |p| p.to_string());
            let queue = socket
                .queue
                .map_or("?".to_string(), |q| format!("{}/{}", q.depth, q.capacity));
            let _ = write!(
                out,
                "{:>4} {:>8} {:>5} {:>3} {:>8} {:>11}",
                handler.slot,
                pid,
                if handler.alive { "yes" } else { "NO" },
                handler.cpu.map_or("-".to_string(), |c| c.to_string()),
                handler.restarts,
                queue,
            );
            for (counter, value) in SlotCounters::COUNTERS.iter().zip(socket.counters.values()) {
                let _ = write!(out, " {value:>w$}", w = column_width(counter.column));
            }
            let _ = writeln!(
                out,
                " {:>9} {:>10}",
                handler.accepted.map_or("-".to_string(), |n| n.to_string()),
                handler
                    .lost_races
                    .map_or("-".to_string(), |n| n.to_string()),
            );
        }
        for (handler, socket) in self.handlers.iter().zip(&self.sockets) {
            if handler.restart_in_ms.is_none() && socket.state == SocketState::AwaitingHandler {
                let _ = writeln!(
                    out,
                    "handler {}: not ready yet; its socket takes new connections only while no other socket has a ready handler",
                    handler.slot
                );
            }
            if handler.restart_in_ms.is_none() && socket.state == SocketState::Restarting {
                let _ = writeln!(
                    out,
                    "handler {}: restarting; its socket takes new connections only when every socket with a ready handler is full",
                    handler.slot
                );
            }
            if socket.state == SocketState::Spare {
                let _ = writeln!(
                    out,
                    "handler {}: spare; its socket takes new connections only when the others are full",
                    handler.slot
                );
            }
            if socket.state == SocketState::Demoted {
                let _ = writeln!(
                    out,
                    "handler {}: stalled (took no connection from its queue for {} s); its queue \
                     moved to the others ({} so far, {} stalls), and its socket takes new \
                     connections only when the others are full until it serves again",
                    handler.slot, self.spec.stall_after, socket.moved_from_stall, socket.stalled
                );
            }
            if let Some(wait) = handler.restart_in_ms {
                let _ = writeln!(
                    out,
                    "handler {} {}: restarting in {wait} ms{}",
                    handler.slot,
                    handler.last_exit.as_deref().unwrap_or("exited"),
                    if socket.state == SocketState::Parked {
                        " (its socket is out of the group meanwhile)"
                    } else {
                        ""
                    }
                );
            }
        }
        for address in &self.addresses {
            let slots: Vec<String> = address.slots.iter().map(u32::to_string).collect();
            let _ = write!(
                out,
                "address {} (bound {}, slots {}): queues {}/{};",
                address.listen,
                address.bound,
                slots.join(","),
                address.queue.queued,
                address.queue.capacity
            );
            for (counter, value) in AddressCounters::COUNTERS
                .iter()
                .zip(address.counters.values())
            {
                let _ = write!(out, " {} {value}", counter.column);
            }
            let _ = writeln!(out);
        }
        if let Some(affinity) = &self.affinity {
            let _ = write!(
                out,
                "affinity client (prefix {}, timeout {} s, when full {}): {} of {} entries;",
                spec.affinity_prefix,
                spec.affinity_timeout,
                spec.affinity_when_full,
                affinity.entries,
                affinity.capacity
            );
            for (counter, value) in AffinityCounters::COUNTERS
                .iter()
                .zip(affinity.counters.values())
            {
                let _ = write!(out, " {} {value}", counter.column);
            }
            out.push('\n');
        }
        if self.audit.restored > 0 {
            let _ = writeln!(
                out,
                "program restored {} times (last: {})",
                self.audit.restored,
                self.audit.last_restored.as_deref().unwrap_or("?")
            );
        }
        if let Some(why) = &self.audit.unavailable {
            let _ = writeln!(out, "program not audited: {why}");
        }
        let which: Vec<String> = GlobalCounters::COUNTERS
            .iter()
            .zip(self.errors.values())
            .filter(|(_, n)| *n > 0)
            .map(|(error, n)| format!("{} {n}", error.column))
            .collect();
        self.render_program(&mut out, self.errors.total(), &which);
        out
    }

    /// The program's line: its id, its fail-open errors (`which`: those that happened, by
    /// name), its verification cost and run time, and the pins.
    fn render_program(&self, out: &mut String, errors: u64, which: &[String]) {
        let _ = write!(
            out,
            "program id {}: {errors} fail-open errors",
            self.program.program_id,
        );
        if !which.is_empty() {
            let _ = write!(out, " ({})", which.join(", "));
        }
        if let Some(insns) = self.program.verified_insns {
            let _ = write!(
                out,
                ", verified in {} insns",
                crate::dataplane::verification::thousands(insns)
            );
        }
        if self.program.stats_enabled && self.program.run_count > 0 {
            let _ = write!(
                out,
                ", {} runs, {:.0} ns/run",
                self.program.run_count,
                self.program.run_time_ns as f64 / self.program.run_count as f64
            );
        } else {
            let _ = write!(out, " (run time: sysctl kernel.bpf_stats_enabled=1)");
        }
        if let Some(pins) = &self.pins {
            let _ = write!(out, "\nmaps pinned at {}", pins.display());
        }
        out.push('\n');
    }

    /// A UDP group's form (docs/udp.md): per slot its handler, its receive buffer (bytes
    /// used / size, and the kernel's drops at it) and what the datagram program did.
    fn render_datagrams(&self) -> String {
        let spec = &self.spec;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "group {}  listen {}  handler {} x{} threads  spawner pid {}",
            spec.name,
            spec.listen_text(),
            spec.handler,
            spec.threads,
            self.spawner_pid
        );
        if !spec.command.is_empty() {
            let _ = writeln!(out, "command: {}", spec.command.join(" "));
        }
        let _ = write!(out, "udp mode {}", spec.udp_mode);
        match self.flow_table {
            Some(table) => {
                let evicted = table
                    .evicted
                    .map(|n| format!(", {n} evicted"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  flows {} live of {}{} recorded (table {}{evicted}, idle time-out {} ms)",
                    table.live,
                    if table.truncated { "at least " } else { "" },
                    table.entries,
                    table.capacity,
                    table.timeout_ms
                );
            }
            None => out.push('\n'),
        }
        // The flow counters are the flow and quic programs', the cookie counter the quic
        // program's: elsewhere they are always 0.
        let flow_mode = self.flow_table.is_some();
        let quic_mode = spec.udp_mode == crate::spec::UdpMode::Quic;
        let shown = |counter: &&parsrv_common::Counter| {
            (flow_mode || !counter.name.starts_with("flow"))
                && (quic_mode || !counter.name.starts_with("cookie"))
        };
        let _ = write!(
            out,
            "{:>4} {:>8} {:>5} {:>3} {:>8} {:>17} {:>6}",
            "slot", "pid", "alive", "cpu", "restarts", "buffer used/size", "drops"
        );
        if flow_mode {
            let _ = write!(out, " {:>6}", "live");
        }
        for counter in UdpSlotCounters::COUNTERS.iter().filter(shown) {
            let _ = write!(
                out,
                " {:>w$}",
                counter.column,
                w = column_width(counter.column)
            );
        }
        let _ = writeln!(out, " {:>9}", "answered");
        for (handler, socket) in self.handlers.iter().zip(&self.sockets) {
            let buffer = socket.datagrams.as_ref().and_then(|d| d.buffer);
            let _ = write!(
                out,
                "{:>4} {:>8} {:>5} {:>3} {:>8} {:>17} {:>6}",
                handler.slot,
                handler.pid.map_or("-".to_string(), |p| p.to_string()),
                if handler.alive { "yes" } else { "NO" },
                handler.cpu.map_or("-".to_string(), |c| c.to_string()),
                handler.restarts,
                buffer.map_or("?".to_string(), |b| format!("{}/{}", b.used, b.size)),
                buffer.map_or("?".to_string(), |b| b.drops.to_string()),
            );
            let counters = socket
                .datagrams
                .as_ref()
                .map(|d| d.counters)
                .unwrap_or_default();
            if flow_mode {
                let live = socket.datagrams.as_ref().and_then(|d| d.flows);
                let _ = write!(out, " {:>6}", live.map_or("?".into(), |n| n.to_string()));
            }
            for (counter, value) in UdpSlotCounters::COUNTERS
                .iter()
                .zip(counters.values())
                .filter(|(counter, _)| shown(counter))
            {
                let _ = write!(out, " {value:>w$}", w = column_width(counter.column));
            }
            let _ = writeln!(
                out,
                " {:>9}",
                handler.accepted.map_or("-".to_string(), |n| n.to_string())
            );
        }
        let errors = self.datagram_errors.unwrap_or_default();
        let which: Vec<String> = UdpErrors::COUNTERS
            .iter()
            .zip(errors.values())
            .filter(|(_, n)| *n > 0)
            .map(|(error, n)| format!("{} {n}", error.column))
            .collect();
        self.render_program(&mut out, errors.total(), &which);
        out
    }
}

/// A counter's column in the status tables: as wide as its title plus one.
pub(super) fn column_width(title: &str) -> usize {
    title.len() + 1
}

#[cfg(test)]
mod tests {
    use parsrv_common::reuseport::SlotCounters;

    use super::super::tests::sample;

    #[test]
    fn each_address_shows_its_slots_queues_and_counters() {
        let text = sample().render();
        let line = text
            .lines()
            .find(|l| l.starts_with("address "))
            .expect("an address line");
        assert_eq!(
            line,
            "address 127.0.0.0/29:8080-8081 (bound 127.0.0.1:8080, slots 0): queues 3/17; \
             served 4 moved-away 2 moved-in 0 all-full 0 no-socket 0"
        );
    }

    #[test]
    fn the_table_names_which_errors_the_program_failed_open_on() {
        let mut status = sample();
        assert!(status.render().contains("5: 0 fail-open errors,"));
        status.errors.read_failed = 2;
        status.errors.select_failed = 1;
        let text = status.render();
        assert!(
            text.contains("5: 3 fail-open errors (read-failed 2, select-failed 1),"),
            "{text}"
        );
    }

    #[test]
    fn table_shows_queue_counters_and_cost() {
        let text = sample().render();
        assert!(text.contains("policy least-loaded"), "{text}");
        let header = text
            .lines()
            .find(|l| l.trim_start().starts_with("slot"))
            .unwrap();
        // The handler's columns, then one per counter in field order, then the handler's
        // own counters.
        let mut columns = vec!["slot", "pid", "alive", "cpu", "restarts", "queue/max"];
        columns.extend(SlotCounters::COUNTERS.iter().map(|c| c.column));
        columns.extend(["accepted", "lost-races"]);
        assert_eq!(header.split_whitespace().collect::<Vec<_>>(), columns);
        assert!(
            text.contains("autoscaled 1..4: 1 handlers now, 2 resizes, last 1 -> 2"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with("0 "))
            .unwrap();
        let counters = sample().sockets[0].counters.values().map(|v| v.to_string());
        let mut cells: Vec<String> = ["0", "43", "yes", "1", "0", "3/16"]
            .map(String::from)
            .into();
        cells.extend(counters);
        cells.extend(["7", "2"].map(String::from));
        assert_eq!(row.split_whitespace().collect::<Vec<_>>(), cells);
        // The sample's counters, where the test can see them: selected 10, redirected 1.
        assert!(row.contains(" 10 ") && cells[6..8] == ["10", "1"], "{row}");
        assert!(text.contains("70 ns/run"), "{text}");
    }
}
