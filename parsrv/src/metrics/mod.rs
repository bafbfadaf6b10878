//! `--metrics ADDR:PORT`: Prometheus text exposition (version 0.0.4) of every group, built
//! from the same status `parsrv status --json` shows, served with `/status` and `/healthz`
//! by [`serve`]; the same server shows a cluster agent's (`crate::cluster::metrics`, which
//! builds its families with [`Family`] and [`write`]).

mod serve;

pub use serve::{health, serve, Exposed, HEAD_TIMEOUT, MAX_CONNECTIONS, MAX_PER_CLIENT};

use std::fmt::Write as _;

use crate::status::GroupStatus;
use parsrv_common::{
    lookup::AddressCounters,
    reuseport::{affinity::AffinityCounters, SlotCounters},
    udp::{UdpSlotCounters, UdpTableCounters},
};

/// One metric family: name, type, help, and its samples (labels, value).
pub(crate) struct Family {
    pub name: String,
    pub kind: &'static str,
    pub help: &'static str,
    pub samples: Vec<(String, f64)>,
}

/// The exposition text for these groups.
pub fn render(groups: &[GroupStatus]) -> String {
    let socket =
        |name: &str, kind, help, value: &dyn Fn(&crate::status::SocketStatus) -> Option<f64>| {
            Family {
                name: name.to_owned(),
                kind,
                help,
                samples: groups
                    .iter()
                    .flat_map(|g| {
                        g.sockets.iter().filter_map(move |s| {
                            value(s).map(|v| {
                                (format!("group=\"{}\",slot=\"{}\"", g.spec.name, s.slot), v)
                            })
                        })
                    })
                    .collect(),
            }
        };
    let group = |name: &str, kind, help, value: fn(&GroupStatus) -> Option<f64>| Family {
        name: name.to_owned(),
        kind,
        help,
        samples: groups
            .iter()
            .filter_map(|g| value(g).map(|v| (format!("group=\"{}\"", g.spec.name), v)))
            .collect(),
    };
    let mut families = vec![
        socket(
            "parsrv_socket_queue_depth",
            "gauge",
            "Connections waiting in the socket's accept queue (TCP_INFO).",
            &|s| s.queue.map(|q| q.depth as f64),
        ),
        socket(
            "parsrv_socket_queue_capacity",
            "gauge",
            "The socket's accept-queue limit (sk_max_ack_backlog; full above it).",
            &|s| s.queue.map(|q| q.capacity as f64),
        ),
    ];
    // The program's per-socket counters, as parsrv-common describes them (a TCP group's
    // sockets; a UDP group's have the datagram program's below).
    for (index, counter) in SlotCounters::COUNTERS.iter().enumerate() {
        let name = format!("parsrv_socket_{}_total", counter.name);
        families.push(socket(&name, "counter", counter.help, &|s| {
            s.datagrams
                .is_none()
                .then(|| s.counters.values()[index] as f64)
        }));
    }
    // A UDP group's sockets (docs/udp.md): the receive buffer, and the datagram program's
    // counters, as parsrv-common describes them.
    let buffer = |s: &crate::status::SocketStatus| s.datagrams.as_ref().and_then(|d| d.buffer);
    families.extend([
        socket(
            "parsrv_socket_receive_buffer_used_bytes",
            "gauge",
            "Bytes the datagrams queued at a UDP socket hold (sk_rmem_alloc: their truesize).",
            &|s| buffer(s).map(|b| b.used as f64),
        ),
        socket(
            "parsrv_socket_receive_buffer_bytes",
            "gauge",
            "A UDP socket's receive buffer (sk_rcvbuf; datagrams beyond it are dropped).",
            &|s| buffer(s).map(|b| b.size as f64),
        ),
        socket(
            "parsrv_socket_receive_drops_total",
            "counter",
            "Datagrams the kernel dropped at a UDP socket (sk_drops: its buffer was full).",
            &|s| buffer(s).map(|b| b.drops as f64),
        ),
        socket(
            "parsrv_socket_flows",
            "gauge",
            "Flows a UDP group in flow mode keeps on the socket that sent within --flow-timeout.",
            &|s| s.datagrams.as_ref().and_then(|d| d.flows).map(|n| n as f64),
        ),
    ]);
    for (index, counter) in UdpSlotCounters::COUNTERS.iter().enumerate() {
        let name = format!("parsrv_socket_datagrams_{}_total", counter.name);
        families.push(socket(&name, "counter", counter.help, &|s| {
            s.datagrams
                .as_ref()
                .map(|d| d.counters.values()[index] as f64)
        }));
    }
    families.extend([
        socket(
            "parsrv_socket_stalled_total",
            "counter",
            "Times the socket's handler took nothing from its queue for --stall-after and the socket was demoted.",
            &|s| Some(s.stalled as f64),
        ),
        socket(
            "parsrv_socket_moved_from_stall_total",
            "counter",
            "Connections moved from the socket's queue to other sockets when its handler stalled.",
            &|s| Some(s.moved_from_stall as f64),
        ),
        socket(
            "parsrv_socket_stall_spared_total",
            "counter",
            "Times the socket's handler looked stalled but was left serving (a thread of it runnable, or it took its queue before the move).",
            &|s| Some(s.stall_spared as f64),
        ),
        Family {
            name: "parsrv_handler_restarts_total".to_owned(),
            kind: "counter",
            help: "Times a slot's handler was started again after it exited.",
            samples: groups
                .iter()
                .flat_map(|g| {
                    g.handlers.iter().map(move |h| {
                        (
                            format!("group=\"{}\",slot=\"{}\"", g.spec.name, h.slot),
                            h.restarts as f64,
                        )
                    })
                })
                .collect(),
        },
        group(
            "parsrv_group_handlers",
            "gauge",
            "Handlers the group runs now.",
            |g| Some(g.handlers.len() as f64),
        ),
        group(
            "parsrv_program_errors_total",
            "counter",
            "Connections (datagrams, in a UDP group) the program left to the kernel's hash after an internal error.",
            |g| Some((g.errors.total() + g.datagram_errors.map_or(0, |e| e.total())) as f64),
        ),
        group(
            "parsrv_program_audits_total",
            "counter",
            "Checks that the group's sockets run its program (the watchdog, iter/tcp).",
            |g| Some(g.audit.checks as f64),
        ),
        group(
            "parsrv_program_restored_total",
            "counter",
            "Times an address of the group ran another program or none, and the watchdog attached the group's again.",
            |g| Some(g.audit.restored as f64),
        ),
        group(
            "parsrv_program_runs_total",
            "counter",
            "Runs of the program (needs kernel.bpf_stats_enabled=1).",
            |g| {
                g.program
                    .stats_enabled
                    .then_some(g.program.run_count as f64)
            },
        ),
        group(
            "parsrv_program_run_seconds_total",
            "counter",
            "Time spent in the program (needs kernel.bpf_stats_enabled=1).",
            |g| {
                g.program
                    .stats_enabled
                    .then_some(g.program.run_time_ns as f64 / 1e9)
            },
        ),
    ]);
    // A UDP group's flow table (flow and quic modes, docs/udp.md).
    families.extend([
        group(
            "parsrv_flow_table_entries",
            "gauge",
            "Entries a UDP group's flow table (quic mode: first-flight table) holds, idle or not.",
            |g| g.flow_table.as_ref().map(|t| t.entries as f64),
        ),
        group(
            "parsrv_flow_table_capacity",
            "gauge",
            "The most entries the flow table holds (--flow-table).",
            |g| g.flow_table.as_ref().map(|t| t.capacity as f64),
        ),
        group(
            "parsrv_flow_table_added_total",
            "counter",
            UdpTableCounters::COUNTERS[0].help,
            |g| g.flow_table.as_ref().and_then(|t| t.added).map(|n| n as f64),
        ),
        group(
            "parsrv_flow_table_evicted_total",
            "counter",
            "Entries the kernel evicted from the full flow table to make room (added less entries): each such flow's next datagram is placed again.",
            |g| g.flow_table.as_ref().and_then(|t| t.evicted).map(|n| n as f64),
        ),
    ]);
    // Client affinity: the dispatch table, and what the dispatchers did, as parsrv-common
    // describes it.
    families.extend([
        group(
            "parsrv_affinity_entries",
            "gauge",
            "Clients with an unexpired entry in the dispatch table.",
            |g| g.affinity.as_ref().map(|a| a.entries as f64),
        ),
        group(
            "parsrv_affinity_capacity",
            "gauge",
            "Entries the dispatch table holds at most.",
            |g| g.affinity.as_ref().map(|a| a.capacity as f64),
        ),
    ]);
    for (index, counter) in AffinityCounters::COUNTERS.iter().enumerate() {
        families.push(Family {
            name: format!("parsrv_affinity_{}_total", counter.name),
            kind: "counter",
            help: counter.help,
            samples: groups
                .iter()
                .filter_map(|g| {
                    let affinity = g.affinity.as_ref()?;
                    Some((
                        format!("group=\"{}\"", g.spec.name),
                        affinity.counters.values()[index] as f64,
                    ))
                })
                .collect(),
        });
    }
    // A group on several addresses: what the sk_lookup program did, per `--listen` entry.
    for (index, counter) in AddressCounters::COUNTERS.iter().enumerate() {
        families.push(Family {
            name: format!("parsrv_address_{}_total", counter.name),
            kind: "counter",
            help: counter.help,
            samples: groups
                .iter()
                .flat_map(|g| {
                    g.addresses.iter().map(move |a| {
                        (
                            format!("group=\"{}\",listen=\"{}\"", g.spec.name, a.listen),
                            a.counters.values()[index] as f64,
                        )
                    })
                })
                .collect(),
        });
    }
    write(&families)
}

/// The exposition text of `families` (those without samples left out).
pub(crate) fn write(families: &[Family]) -> String {
    let mut out = String::new();
    for family in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
        for (labels, value) in &family.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", family.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_families_with_labels() {
        let status = crate::status::tests::sample();
        let text = super::render(&[status]);
        assert!(
            text.contains("# TYPE parsrv_socket_queue_depth gauge\n"),
            "{text}"
        );
        assert!(text.contains("parsrv_socket_queue_depth{group=\"web\",slot=\"0\"} 3\n"));
        assert!(text.contains("parsrv_socket_selected_total{group=\"web\",slot=\"0\"} 10\n"));
        assert!(text.contains("parsrv_group_handlers{group=\"web\"} 1\n"));
        // One counter family per described per-socket counter, with its help.
        for counter in parsrv_common::reuseport::SlotCounters::COUNTERS {
            let name = format!("parsrv_socket_{}_total", counter.name);
            assert!(
                text.contains(&format!(
                    "# HELP {name} {}\n# TYPE {name} counter\n",
                    counter.help
                )),
                "{text}"
            );
        }
        assert!(text.contains("parsrv_socket_redirected_away_total{group=\"web\",slot=\"0\"} 1\n"));
        assert!(text.contains("parsrv_socket_migrated_in_total{group=\"web\",slot=\"0\"} 0\n"));
        assert!(text.contains("parsrv_program_runs_total{group=\"web\"} 10\n"));
        assert!(text.contains("parsrv_affinity_entries{group=\"web\"} 2\n"));
        // Several addresses: each entry's counters, labelled with the entry.
        assert!(text.contains(
            "parsrv_address_moved_away_total{group=\"web\",listen=\"127.0.0.0/29:8080-8081\"} 2\n"
        ));
        for counter in parsrv_common::lookup::AddressCounters::COUNTERS {
            let name = format!("parsrv_address_{}_total", counter.name);
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{text}");
        }
        assert!(text.contains("parsrv_affinity_lock_races_total{group=\"web\"} 1\n"));
    }
}
