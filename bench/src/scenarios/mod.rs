//! The suite's scenarios, one file each, and [`SCENARIOS`]: the one table of their names,
//! what each measures and how it runs, which `main` selects from and runs in its order.

mod addresses;
mod affinity;
mod burst;
mod cluster;
mod dns;
mod faults;
mod overhead;
mod policies;
mod prog_cost;
mod restart;
mod scale_up;
mod slow_handler;
mod spawner_kill;
mod stall;
mod udp_cost;
mod uniform;

pub use affinity::sticky_worker;

use crate::report::Report;

/// One scenario of the suite.
pub struct Scenario {
    /// What the command line and the report call it.
    pub name: &'static str,
    /// What it measures, in one line (`--list`).
    pub description: &'static str,
    /// Runs it into the report; `true` with `--quick`.
    pub run: fn(&mut Report, bool),
}

/// Every scenario, in the order of a run of them all.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "uniform",
        description: "every model under the same closed-loop load, in rotating order; wrk confirms",
        run: uniform::uniform,
    },
    Scenario {
        name: "stall",
        description: "one worker of four stopped mid-run under an open-loop load",
        run: stall::stall,
    },
    Scenario {
        name: "burst",
        description: "more connections at once than the accept queues hold",
        run: burst::burst,
    },
    Scenario {
        name: "slow-handler",
        description: "one worker of four ten times slower than the others",
        run: slow_handler::slow_handler,
    },
    Scenario {
        name: "policies",
        description:
            "the three policies on even load, a slow and a stopped worker, 2 to 64 sockets",
        run: policies::policies,
    },
    Scenario {
        name: "prog-cost",
        description: "the program's run time per selection, per policy and socket count",
        run: prog_cost::prog_cost,
    },
    Scenario {
        name: "scale-up",
        description: "overload onset to a new handler's first accept, against a 1 s supervisor",
        run: scale_up::scale_up,
    },
    Scenario {
        name: "restart",
        description: "rolling restarts under load, against plain SO_REUSEPORT servers",
        run: restart::restart,
    },
    Scenario {
        name: "faults",
        description: "handler kills, a spoofed SYN flood and monitoring scrapes under idle clients",
        run: faults::faults,
    },
    Scenario {
        name: "spawner-kill",
        description: "the spawner killed and started again under load, adopting its handlers",
        run: spawner_kill::spawner_kill,
    },
    Scenario {
        name: "affinity",
        description: "client affinity's cost, and sticky handlers against HAProxy",
        run: affinity::affinity,
    },
    Scenario {
        name: "overhead",
        description: "parsrv redirect against plain SO_REUSEPORT, and where the cost goes",
        run: overhead::overhead,
    },
    Scenario {
        name: "addresses",
        description: "what serving a group on a second address (sk_lookup) costs",
        run: addresses::addresses,
    },
    Scenario {
        name: "cluster",
        description: "the host dispatchers on three hosts behind a multipath route",
        run: cluster::cluster,
    },
    Scenario {
        name: "dns",
        description: "Unbound x4 with one stopped under dnsperf: answered queries and latency, parsrv against plain SO_REUSEPORT",
        run: dns::dns,
    },
    Scenario {
        name: "udp-cost",
        description:
            "the UDP programs' cost per datagram (datagram and flow modes), 4 to 128 sockets",
        run: udp_cost::udp_cost,
    },
];

/// The scenarios `wanted` names, in its order (a name given twice runs twice), or all of
/// them when it names none; `Err` holds the first name that is no scenario.
pub fn select<'a>(wanted: &[&'a str]) -> Result<Vec<&'static Scenario>, &'a str> {
    if wanted.is_empty() {
        return Ok(SCENARIOS.iter().collect());
    }
    wanted
        .iter()
        .map(|w| SCENARIOS.iter().find(|s| s.name == *w).ok_or(*w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(selected: &[&Scenario]) -> Vec<&'static str> {
        selected.iter().map(|s| s.name).collect()
    }

    #[test]
    fn names_are_unique_and_each_selects_its_scenario() {
        for (i, scenario) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|s| s.name != scenario.name),
                "{} twice",
                scenario.name
            );
            assert_eq!(names(&select(&[scenario.name]).unwrap()), [scenario.name]);
        }
    }

    #[test]
    fn descriptions_are_one_line() {
        for scenario in SCENARIOS {
            assert!(!scenario.description.is_empty(), "{}", scenario.name);
            assert!(!scenario.description.contains('\n'), "{}", scenario.name);
        }
    }

    #[test]
    fn none_named_runs_all_in_table_order() {
        assert_eq!(
            names(&select(&[]).unwrap()),
            names(&SCENARIOS.iter().collect::<Vec<_>>())
        );
    }

    #[test]
    fn named_ones_run_in_the_order_given() {
        let selected = select(&["stall", "uniform", "stall"]).unwrap();
        assert_eq!(names(&selected), ["stall", "uniform", "stall"]);
    }

    #[test]
    fn the_first_unknown_name_is_the_error() {
        assert_eq!(select(&["uniform", "nope", "other"]).err(), Some("nope"));
    }
}
