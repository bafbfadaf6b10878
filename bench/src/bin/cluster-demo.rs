//! `cargo xtask cluster-demo` (as root): a router and three hosts in network namespaces of
//! its own (documentation addresses only), BIRD announcing the service from each host that
//! is ready, parsrv's group and cluster agent on each host, and 30 clients with two
//! long-lived connections each, then 10 more. It prints where the connections are while host 3 joins,
//! host 2 drains and leaves, and the route changes; then removes everything.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use parsrv_integration_tests::{
    cluster::{LongLived, Topology},
    isolated,
};

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cluster-demo: needs root (network namespaces, eBPF)");
        std::process::exit(2);
    }
    isolated(demo);
}

fn demo() {
    let started = Instant::now();
    let say = |what: &str| println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    say("building: clients (198.51.100.0/24) -> router -> hosts 1-3 (192.0.2.11-13), service 203.0.113.10:8080");
    let mut topology = Topology::build(3, 40);
    for id in 1..=3 {
        topology.start_group(id);
    }
    topology.start_bird();
    say("BIRD runs on the router and the hosts; parsrv groups run on hosts 1-3; starting the agents of hosts 1 and 2");
    topology.start_agent(1);
    topology.start_agent(2);
    topology.wait_ready(&[1, 2]);
    topology.wait_route(&[1, 2]);
    show_route(&topology, &say);
    let (clients, newcomers) = topology.client_addrs.split_at(30);
    let (clients, newcomers) = (clients.to_vec(), newcomers.to_vec());
    let load = LongLived::open(&topology, &clients, 2, Duration::from_secs(120));
    thread::sleep(Duration::from_millis(500));
    show(&topology, &load, &say, "30 clients, 2 connections each");

    say("host 3 joins: its agent gets every peer's table, then BIRD announces it");
    topology.start_agent(3);
    topology.wait_ready(&[1, 2, 3]);
    topology.wait_route(&[1, 2, 3]);
    show_route(&topology, &say);
    thread::sleep(Duration::from_secs(2));
    show(
        &topology,
        &load,
        &say,
        "after the join (existing clients stay where they are)",
    );
    let later = LongLived::open(&topology, &clients[..6], 1, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(300));
    show(
        &topology,
        &later,
        &say,
        "6 of the clients open one more connection each: same host as before",
    );
    let new = LongLived::open(&topology, &newcomers, 2, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(300));
    show(
        &topology,
        &new,
        &say,
        "10 new clients: spread over the three hosts by their room",
    );

    say("host 2 drains: `parsrv cluster drain web` runs its `draining` command, BIRD withdraws it");
    let (code, out, err) = topology.parsrv_output(2, &["cluster", "drain", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    topology.wait_route(&[1, 3]);
    show_route(&topology, &say);
    thread::sleep(Duration::from_secs(2));
    show(
        &topology,
        &load,
        &say,
        "host 2 is out of the route; its connections are reached through the others",
    );

    say("host 2's clients end their connections, then host 2's agent stops (SIGTERM)");
    for connections in [&load, &later, &new] {
        let hosts = connections.hosts_of_clients(&topology);
        for (index, client) in connections.clients.iter().enumerate() {
            if hosts.get(client).is_some_and(|h| h.contains(&2)) {
                connections.close(index);
            }
        }
    }
    thread::sleep(Duration::from_millis(300));
    let _ = topology.stop_agent(2);
    thread::sleep(Duration::from_secs(2));
    show(&topology, &load, &say, "host 2 left");
    let status = topology.cluster_status(1).unwrap_or_default();
    say(&format!(
        "host 1's view: peers {}",
        status["peers"]
            .as_array()
            .map(|p| p
                .iter()
                .map(|p| format!("{}: {}", p["host"], p["state"].as_str().unwrap_or("gone")))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    ));
    let broken = load.broken() + later.broken() + new.broken();
    new.finish();
    later.finish();
    load.finish();
    say(&format!(
        "done: {broken} connections broken. `parsrv cluster status web` on a host shows the same \
         figures; everything the demo made is removed now"
    ));
}

fn show_route(topology: &Topology, say: &dyn Fn(&str)) {
    let hops: Vec<String> = topology
        .router_next_hops()
        .iter()
        .map(|a| a.to_string())
        .collect();
    say(&format!(
        "router: 203.0.113.10/32 via {} (ECMP, L4 hash, from BGP)",
        hops.join(", ")
    ));
}

fn show(topology: &Topology, load: &LongLived, say: &dyn Fn(&str), title: &str) {
    let hosts = load.hosts_of_clients(topology);
    let mut clients_per_host: BTreeMap<u16, usize> = BTreeMap::new();
    for set in hosts.values() {
        for host in set {
            *clients_per_host.entry(*host).or_default() += 1;
        }
    }
    let forwarded: Vec<String> = topology
        .hosts
        .iter()
        .filter_map(|h| {
            let s = topology.cluster_status(h.id)?;
            Some(format!(
                "host {}: {} forwarded",
                h.id, s["dispatcher"]["forwarded"]
            ))
        })
        .collect();
    say(&format!(
        "{title}: clients per host {clients_per_host:?}, broken {}, {}",
        load.broken(),
        forwarded.join(", ")
    ));
}
