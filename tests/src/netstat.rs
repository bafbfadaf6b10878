//! The kernel's own TCP and UDP counters (/proc/net/netstat, /proc/net/snmp), read in the test's
//! network namespace: the ground truth tests compare against.

use std::fs;

/// Kernel TCP counters of the calling thread's network namespace.
///
/// Read from /proc/thread-self/net: /proc/net follows the main thread, whose namespace is
/// not the test's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub out_rsts: u64,
    pub migrate_req_success: u64,
    pub migrate_req_failure: u64,
}

impl NetCounters {
    pub fn read() -> Self {
        let netstat = fs::read_to_string("/proc/thread-self/net/netstat").expect("netstat");
        let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        NetCounters {
            listen_overflows: counter(&netstat, "TcpExt", "ListenOverflows"),
            listen_drops: counter(&netstat, "TcpExt", "ListenDrops"),
            out_rsts: counter(&snmp, "Tcp", "OutRsts"),
            migrate_req_success: counter(&netstat, "TcpExt", "TCPMigrateReqSuccess"),
            migrate_req_failure: counter(&netstat, "TcpExt", "TCPMigrateReqFailure"),
        }
    }

    /// What happened between `self` and `later`.
    pub fn delta(&self, later: &Self) -> Self {
        NetCounters {
            listen_overflows: later.listen_overflows - self.listen_overflows,
            listen_drops: later.listen_drops - self.listen_drops,
            out_rsts: later.out_rsts - self.out_rsts,
            migrate_req_success: later.migrate_req_success - self.migrate_req_success,
            migrate_req_failure: later.migrate_req_failure - self.migrate_req_failure,
        }
    }
}

/// Kernel UDP counters (/proc/net/snmp, `Udp:`) of the calling thread's network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams read by applications (counted at recvmsg, not at queueing).
    pub in_datagrams: u64,
    /// Datagrams to a port with no socket, or refused by a reuseport program (SK_DROP): each
    /// answered with an ICMP port unreachable.
    pub no_ports: u64,
    /// Datagrams dropped because the chosen socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    pub in_errors: u64,
}

impl UdpCounters {
    pub fn read() -> Self {
        let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        UdpCounters {
            in_datagrams: counter(&snmp, "Udp", "InDatagrams"),
            no_ports: counter(&snmp, "Udp", "NoPorts"),
            rcvbuf_errors: counter(&snmp, "Udp", "RcvbufErrors"),
            in_errors: counter(&snmp, "Udp", "InErrors"),
        }
    }

    /// What happened between `self` and `later`.
    pub fn delta(&self, later: &Self) -> Self {
        UdpCounters {
            in_datagrams: later.in_datagrams - self.in_datagrams,
            no_ports: later.no_ports - self.no_ports,
            rcvbuf_errors: later.rcvbuf_errors - self.rcvbuf_errors,
            in_errors: later.in_errors - self.in_errors,
        }
    }
}

/// Every counter of the calling thread's namespace, as `Table.Name`: to show, when an
/// assertion on one fails, what else moved (TcpExt's TCPAbortOn* say why a RST was sent).
pub fn all_net_counters() -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    for file in ["netstat", "snmp"] {
        let table = fs::read_to_string(format!("/proc/thread-self/net/{file}")).expect(file);
        let lines: Vec<&str> = table.lines().collect();
        for pair in lines.chunks(2) {
            let [header, values] = pair else { continue };
            let mut names = header.split_whitespace();
            let prefix = names.next().unwrap_or("").trim_end_matches(':');
            for (name, value) in names.zip(values.split_whitespace().skip(1)) {
                if let Ok(value) = value.parse() {
                    all.insert(format!("{prefix}.{name}"), value);
                }
            }
        }
    }
    all
}

/// The counters that changed between two [`all_net_counters`], as `name +delta`.
pub fn changed_net_counters(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    after
        .iter()
        .filter_map(|(name, value)| {
            let old = before.get(name).copied().unwrap_or(0);
            (*value != old).then(|| format!("{name} {:+}", *value as i64 - old as i64))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One counter from a /proc/net/{netstat,snmp} table: a header line and a value line that
/// start with the same `prefix:`.
fn counter(table: &str, prefix: &str, name: &str) -> u64 {
    let prefix = format!("{prefix}:");
    let mut lines = table.lines().filter(|l| l.starts_with(&prefix));
    let (header, values) = (lines.next().expect("header"), lines.next().expect("values"));
    header
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(h, _)| *h == name)
        .unwrap_or_else(|| panic!("no {name} in {prefix}"))
        .1
        .parse()
        .expect("a number")
}
