//! One group on several addresses: sockets bound to different addresses
//! form one list. A connection for an address whose sockets are all full goes to a socket of
//! another address with room, keeping the address the client asked for; a prefix and a port
//! range are served by sockets bound to one address; nothing else in the namespace is
//! touched. Each test runs in its own network namespace, whose loopback holds 127.0.0.0/8
//! (and the IPv6 addresses a test adds).

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use nix::sys::signal::Signal;
use parsrv::dataplane::pins::group_dir as pin_dir;
use parsrv_integration_tests::{
    all_net_counters, connect, established_local_addrs, group, kill_spawner, parsrv_lookup_links,
    privileged, read_answer, signal, stop_process, wait_for, Feature, GroupBuilder, HandlerKind,
    Needs, NetCounters, Outcome, PlainGroup, Spawner, HTTP_REQUEST,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn needs() -> Needs {
    Needs::program().and(Feature::SkLookup)
}

fn at(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

/// One HTTP request to `addr`; the body of the answer.
fn ask(addr: SocketAddr, timeout: Duration) -> Result<String, Outcome> {
    let mut stream = connect(addr, timeout)?;
    stream.write_all(HTTP_REQUEST).map_err(|_| Outcome::Reset)?;
    let answer = read_answer(&mut stream, timeout)?;
    Ok(answer
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The pid in a built-in handler's answer (`parsrv handler SLOT (pid PID)`).
fn pid_in(body: &str) -> Option<u32> {
    parsrv_integration_tests::answering_pid(body)
}

/// A group on two entries with two handlers each (slots 0 and 2 on the first, 1 and 3 on
/// the second), queues of 4.
fn two_handlers_each(name: &str, listen: &[&str; 2]) -> GroupBuilder {
    group(name, HandlerKind::Http)
        .listen_on(listen)
        .handlers(4)
        .backlog(4)
        .no_autoscale()
        // Stall detection off: stopped handlers are how these tests fill an address's
        // queues (`stall` tests the two together).
        .stopped_handlers_keep_their_share()
}

/// Stops the handlers of `slots` and fills their queues through `addr` (the other slots of
/// the address are stopped as well, so what `addr` gets waits there).
fn stop_and_fill(spawner: &Spawner, slots: &[usize], addr: SocketAddr) -> Vec<TcpStream> {
    for &slot in slots {
        stop_process(spawner.handler_pid(slot));
    }
    slots
        .iter()
        .flat_map(|&slot| spawner.fill_queue(slot, addr))
        .collect()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_full_address_sends_its_connections_to_another_addresss_handlers_keeping_the_address() {
    privileged(needs(), || {
        let (full, other) = (at("127.0.0.2:8080"), at("127.0.0.3:8080"));
        // Control first, in the same namespace: two plain SO_REUSEPORT groups on two
        // addresses, the first one's sockets never accepting. Nothing moves its clients.
        {
            let _stuck = PlainGroup::start(at("127.0.0.4:8080"), 2, 4, &[]);
            let _serving = PlainGroup::start(at("127.0.0.5:8080"), 2, 4, &[0, 1]);
            assert_eq!(ask(at("127.0.0.5:8080"), TIMEOUT).as_deref(), Ok("plain\n"));
            let failed = (0..30)
                .filter(|_| ask(at("127.0.0.4:8080"), Duration::from_millis(300)).is_err())
                .count();
            assert_eq!(failed, 30, "the plain control's stuck address answered");
        }

        let spawner =
            two_handlers_each("two-addresses", &["127.0.0.2:8080", "127.0.0.3:8080"]).start();
        let status = spawner.status();
        assert_eq!(status.addresses.len(), 2);
        assert_eq!(status.addresses[0].slots, [0, 2]);
        assert_eq!(status.addresses[1].slots, [1, 3]);
        assert_eq!(parsrv_lookup_links().len(), 1, "one sk_lookup link");
        // Both addresses served while nothing is full: each by its own handlers.
        let own = |addr| pid_in(&ask(addr, TIMEOUT).unwrap()).unwrap();
        assert!([0, 2].map(|s| spawner.handler_pid(s)).contains(&own(full)));
        assert!([1, 3].map(|s| spawner.handler_pid(s)).contains(&own(other)));

        let _held = stop_and_fill(&spawner, &[0, 2], full);
        let takers = [1, 3].map(|s| spawner.handler_pid(s));
        let before = spawner.status().addresses;
        let kernel = NetCounters::read();
        let answered: Vec<Result<String, Outcome>> = (0..200).map(|_| ask(full, TIMEOUT)).collect();
        let kernel = kernel.delta(&NetCounters::read());
        let failed = answered.iter().filter(|a| a.is_err()).count();
        assert_eq!(failed, 0, "{failed} of 200 failed:\n{}", spawner.log());
        for body in answered.iter().flatten() {
            let pid = pid_in(body).expect("a handler's answer");
            assert!(
                takers.contains(&pid),
                "answered by {pid}, not by 127.0.0.3's handlers"
            );
        }
        assert_eq!(kernel.listen_overflows, 0, "the kernel dropped SYNs");
        let after = spawner.status().addresses;
        let moved = |i: usize, f: fn(&parsrv_common::lookup::AddressCounters) -> u64| {
            f(&after[i].counters) - f(&before[i].counters)
        };
        assert_eq!(moved(0, |c| c.moved_away), 200);
        assert_eq!(moved(1, |c| c.moved_in), 200);
        assert_eq!(moved(0, |c| c.served), 0);

        // The handlers that took them see the address the client asked for as the local one.
        let open: Vec<TcpStream> = (0..20).map(|_| connect(full, TIMEOUT).unwrap()).collect();
        let locals = || -> Vec<SocketAddr> {
            takers
                .iter()
                .flat_map(|&pid| established_local_addrs(pid))
                .collect()
        };
        assert!(
            wait_for(Duration::from_secs(5), || locals()
                .iter()
                .filter(|a| **a == full)
                .count()
                >= open.len()),
            "local addresses of the takers' connections: {:?}",
            locals()
        );
        assert!(!locals().contains(&other), "a connection kept 127.0.0.3");
        drop(open);
        assert!(spawner.stop().success());
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new(), "a link was left");
        assert!(!pin_dir("two-addresses").exists());
    });
}

/// Each program is an object of its own, and a group loads only what it uses: a group on one
/// address creates (and pins) none of the sk_lookup program's maps and attaches no lookup
/// link, a group on two addresses has them, and its lookup program runs on the very SOCKETS
/// and CONFIG that its SK_REUSEPORT program's spawner fills (the same map ids).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_group_loads_only_the_programs_and_maps_it_uses() {
    privileged(needs(), || {
        use parsrv_common::{lookup::names as lookup, reuseport::names as reuseport};
        let pins = |group: &str| -> std::collections::BTreeSet<String> {
            std::fs::read_dir(pin_dir(group))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let lookup_pins = [
            lookup::RULES,
            lookup::SLOT_LISTEN,
            lookup::COUNTERS,
            lookup::LINK,
        ];

        let one = group("one-address", HandlerKind::Http)
            .listen_on(&["127.0.0.6:8080"])
            .handlers(2)
            .no_autoscale()
            .start();
        let one_pins = pins("one-address");
        assert!(one_pins.contains(reuseport::SOCKETS), "{one_pins:?}");
        for name in lookup_pins {
            assert!(
                !one_pins.contains(name),
                "a group on one address has {name}: {one_pins:?}"
            );
        }
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new(), "a lookup link");

        let two = two_handlers_each("two-addresses", &["127.0.0.2:8080", "127.0.0.3:8080"]).start();
        let two_pins = pins("two-addresses");
        for name in lookup_pins {
            assert!(
                two_pins.contains(name),
                "a group on two addresses lacks {name}: {two_pins:?}"
            );
        }
        let links = parsrv_lookup_links();
        assert_eq!(links.len(), 1, "one sk_lookup link");
        let pinned_id = |name: &str| {
            aya::maps::MapInfo::from_pin(pin_dir("two-addresses").join(name))
                .unwrap()
                .id()
        };
        // The program of this group's link (another parsrv on the host may run one too).
        let program_id = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .find(|l| l.id() == links[0])
            .expect("the group's lookup link")
            .program_id();
        let program = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == program_id)
            .expect("the lookup program is loaded");
        assert_eq!(program.name_as_str(), Some(lookup::PROGRAM));
        let used = program.map_ids().unwrap().expect("map ids (Linux 4.15+)");
        let shared_and_own = [
            reuseport::SOCKETS,
            reuseport::CONFIG,
            lookup::RULES,
            lookup::SLOT_LISTEN,
            lookup::COUNTERS,
        ]
        .map(|name| (name, pinned_id(name)));
        for (name, id) in shared_and_own {
            assert!(
                used.contains(&id),
                "the lookup program does not use the group's {name} ({id}): {used:?}"
            );
        }
        // Besides: its two per-CPU scratch maps, private to it.
        let private: Vec<String> = used
            .iter()
            .filter(|id| !shared_and_own.iter().any(|(_, pinned)| pinned == *id))
            .map(|&id| {
                let info = aya::maps::MapInfo::from_id(id).unwrap();
                info.name_as_str().unwrap_or_default().to_owned()
            })
            .collect();
        assert_eq!(
            std::collections::BTreeSet::from_iter(private.iter().map(String::as_str)),
            std::collections::BTreeSet::from([lookup::SCRATCH, reuseport::SCRATCH]),
            "the lookup program's other maps"
        );
        assert_eq!(private.len(), 2);
        assert!(two.stop().success());
        assert!(one.stop().success());
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new(), "a link was left");
    });
}

/// Under syncookies the final ACK finds no request socket, so the kernel looks for a listener
/// again and the sk_lookup program runs again. With `tcp_syncookies=2` every connection goes
/// so: each must still complete on the address its SYN was moved to (a cookie is accepted
/// by any listener that sent cookies lately, and the program decides the same way while the
/// queues stand still).
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn connections_moved_to_another_address_complete_when_every_handshake_is_a_syncookie() {
    privileged(needs(), || {
        // This test's own network namespace: the setting is the namespace's.
        std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2").unwrap();
        let (full, other) = (at("127.0.0.2:8080"), at("127.0.0.3:8080"));
        let spawner =
            two_handlers_each("syncookies", &["127.0.0.2:8080", "127.0.0.3:8080"]).start();
        assert!(ask(other, TIMEOUT).is_ok());
        let _held = stop_and_fill(&spawner, &[0, 2], full);
        let cookies = || {
            let counters = all_net_counters();
            ["SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed"]
                .map(|name| counters[&format!("TcpExt.{name}")])
        };
        let (before, kernel_before) = (spawner.status().addresses, cookies());
        let answered: Vec<_> = (0..100).map(|_| ask(full, TIMEOUT)).collect();
        let (after, kernel_after) = (spawner.status().addresses, cookies());
        let failed = answered.iter().filter(|a| a.is_err()).count();
        assert_eq!(failed, 0, "{failed} of 100 failed:\n{}", spawner.log());
        // Each connection ran the program at least twice (SYN, then the final ACK), each
        // time moved; the kernel counts each of those runs as a cookie sent or one checked.
        // Not exactly 200: a SYN retransmitted after a second without a SYN-ACK (an
        // emulated VM's CPU can stall that long beside other VMs) or the request racing its
        // own final ACK on the other CPU runs the program once more (seen once in a 6.1 VM:
        // 201), and so does the last filling connection's ACK when it arrives late.
        let [sent, recv, failed] = [0, 1, 2].map(|i| kernel_after[i] - kernel_before[i]);
        let moved = after[0].counters.moved_away - before[0].counters.moved_away;
        eprintln!("moved away {moved}; syncookies sent {sent}, received {recv}, failed {failed}");
        assert!(sent >= 100 && recv >= 100, "sent {sent}, received {recv}");
        assert_eq!(moved, sent + recv + failed);
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_ipv4_address_overflows_to_dual_stack_ipv6_sockets_and_ipv6_never_to_ipv4_ones() {
    privileged(needs(), || {
        // The kernel hands an IPv4 connection only to a dual-stack IPv6 socket: one bound to
        // [::] (binding a specific IPv6 address makes a socket IPv6-only).
        let (v4, v6) = (at("127.0.0.2:8080"), at("[::1]:8081"));
        let spawner = two_handlers_each("two-families", &["127.0.0.2:8080", "[::]:8081"]).start();
        let _held = stop_and_fill(&spawner, &[0, 2], v4);
        let takers = [1, 3].map(|s| spawner.handler_pid(s));
        let answered: Vec<_> = (0..50).map(|_| ask(v4, TIMEOUT)).collect();
        assert_eq!(answered.iter().filter(|a| a.is_err()).count(), 0);
        for body in answered.iter().flatten() {
            assert!(takers.contains(&pid_in(body).unwrap()));
        }
        // An IPv4 connection on an IPv6 socket: the local address is 127.0.0.2, mapped.
        let open: Vec<TcpStream> = (0..5).map(|_| connect(v4, TIMEOUT).unwrap()).collect();
        let mapped = at("[::ffff:127.0.0.2]:8080");
        assert!(wait_for(Duration::from_secs(5), || takers
            .iter()
            .flat_map(|&pid| established_local_addrs(pid))
            .filter(|a| *a == mapped)
            .count()
            >= open.len()));
        drop(open);

        // The other way the kernel refuses (an IPv6 connection to an IPv4 socket): with the
        // IPv6 handlers stopped and full, IPv6 clients wait, and nothing is sent to IPv4.
        for slot in [0, 2] {
            signal(spawner.handler_pid(slot), Signal::SIGCONT);
        }
        let _held_v6 = stop_and_fill(&spawner, &[1, 3], v6);
        let before = spawner.status().addresses;
        let failed = (0..5)
            .filter(|_| ask(v6, Duration::from_millis(500)).is_err())
            .count();
        let after = spawner.status().addresses;
        assert_eq!(failed, 5);
        assert_eq!(after[1].counters.moved_away, before[1].counters.moved_away);
        assert!(after[1].counters.all_full >= before[1].counters.all_full + 5);
        for slot in [1, 3] {
            signal(spawner.handler_pid(slot), Signal::SIGCONT);
        }
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_prefix_of_addresses_and_a_port_range_reach_one_group_and_nothing_else_is_touched() {
    privileged(needs(), || {
        // Plain servers on an address outside the prefix, and on a port outside the range.
        let outside_addr = at("127.0.0.16:9001");
        let outside_port = at("127.0.0.10:9004");
        let _plain = [
            PlainGroup::start(outside_addr, 1, 16, &[0]),
            PlainGroup::start(outside_port, 1, 16, &[0]),
        ];
        let plain_answers = || {
            for addr in [outside_addr, outside_port] {
                assert_eq!(ask(addr, TIMEOUT).as_deref(), Ok("plain\n"), "{addr}");
            }
        };
        plain_answers();

        let spawner = group("prefix", HandlerKind::Http)
            .listen_on(&["127.0.0.8/29:9001-9003"])
            .handlers(2)
            .no_autoscale()
            .start();
        let pids = [0, 1].map(|s| spawner.handler_pid(s));
        let mut asked = Vec::new();
        for host in 8..16 {
            for port in 9001..=9003 {
                let addr = SocketAddr::new(IpAddr::from([127, 0, 0, host]), port);
                let body = ask(addr, TIMEOUT).unwrap_or_else(|e| panic!("{addr}: {e:?}"));
                assert!(pids.contains(&pid_in(&body).unwrap()), "{addr}: {body}");
                asked.push(addr);
            }
        }
        assert_eq!(asked.len(), 24);
        // Each connection's local address is the one asked for.
        let open: Vec<TcpStream> = asked
            .iter()
            .map(|a| connect(*a, TIMEOUT).unwrap())
            .collect();
        assert!(
            wait_for(Duration::from_secs(5), || {
                let locals: Vec<SocketAddr> = pids
                    .iter()
                    .flat_map(|&pid| established_local_addrs(pid))
                    .collect();
                asked.iter().all(|a| locals.contains(a))
            }),
            "not every address asked for is a local address of a handler's connection"
        );
        drop(open);
        plain_answers();
        let status = spawner.status();
        assert!(status.addresses[0].counters.served >= 48);
        assert!(spawner.stop().success());
        plain_answers();
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new());
        // Without the group, the prefix is nobody's again.
        assert_eq!(
            connect(at("127.0.0.12:9002"), TIMEOUT).unwrap_err(),
            Outcome::Refused
        );
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn an_address_with_a_count_gets_that_many_sockets_in_each_round_of_slots() {
    privileged(needs(), || {
        let spawner = group("counted", HandlerKind::Http)
            .listen_on(&["127.0.0.2:8080=3", "127.0.0.3:8080"])
            .handlers(5)
            .no_autoscale()
            .start();
        let status = spawner.status();
        assert_eq!(status.addresses[0].slots, [0, 1, 2, 4]);
        assert_eq!(status.addresses[1].slots, [3]);
        let only = spawner.handler_pid(3);
        for _ in 0..10 {
            let body = ask(at("127.0.0.3:8080"), TIMEOUT).unwrap();
            assert_eq!(pid_in(&body), Some(only), "{body}");
        }
        assert!(spawner.stop().success());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_spawner_that_adopts_a_group_on_several_addresses_keeps_moving_its_connections() {
    privileged(needs(), || {
        let (full, other) = (at("127.0.0.2:8080"), at("127.0.0.3:8080"));
        let two = || two_handlers_each("adopted-addresses", &["127.0.0.2:8080", "127.0.0.3:8080"]);
        let first = two().start();
        let handlers: Vec<u32> = (0..4).map(|s| first.handler_pid(s)).collect();
        kill_spawner(&first);
        let again = two().start();
        assert!(
            again.log().contains("adopting its running handlers"),
            "{}",
            again.log()
        );
        assert_eq!(
            (0..4).map(|s| again.handler_pid(s)).collect::<Vec<_>>(),
            handlers
        );
        let _held = stop_and_fill(&again, &[0, 2], full);
        let failed = (0..50).filter(|_| ask(full, TIMEOUT).is_err()).count();
        assert_eq!(
            failed,
            0,
            "{failed} of 50 failed after adoption:\n{}",
            again.log()
        );
        let status = again.status();
        assert!(status.addresses[0].counters.moved_away >= 50);
        assert!(ask(other, TIMEOUT).is_ok());
        for slot in [0, 2] {
            signal(again.handler_pid(slot), Signal::SIGCONT);
        }
        assert!(again.stop().success());
        drop(first);
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_killed_group_on_several_addresses_leaves_nothing_that_steers_once_its_sockets_go() {
    privileged(needs(), || {
        let spawner = group("killed", HandlerKind::Http)
            .listen_on(&["127.0.0.2:8080", "127.0.0.0/29:9000"])
            .handlers(2)
            .no_autoscale()
            .start();
        let handlers = [0, 1].map(|s| spawner.handler_pid(s));
        assert!(ask(at("127.0.0.5:9000"), TIMEOUT).is_ok());
        // The spawner dies: its handlers serve on, every address included (the link is
        // pinned, not held by the spawner).
        signal(spawner.pid(), Signal::SIGKILL);
        assert!(wait_for(Duration::from_secs(5), || !std::path::Path::new(
            &format!("/proc/{}", spawner.pid())
        )
        .exists()
            || std::fs::read_to_string(format!(
                "/proc/{}/stat",
                spawner.pid()
            ))
            .is_ok_and(|s| s.contains(") Z"))));
        for addr in ["127.0.0.2:8080", "127.0.0.5:9000", "127.0.0.1:9000"] {
            let body = ask(at(addr), TIMEOUT).unwrap_or_else(|e| panic!("{addr}: {e:?}"));
            assert!(handlers.contains(&pid_in(&body).unwrap()));
        }
        // Then the handlers: the group's sockets are gone.
        for pid in handlers {
            signal(pid, Signal::SIGKILL);
        }
        assert!(wait_for(Duration::from_secs(5), || matches!(
            connect(at("127.0.0.2:8080"), Duration::from_millis(300)),
            Err(Outcome::Refused)
        )));
        // A plain server started on the prefix's other address gets its own connections.
        let plain = PlainGroup::start(at("127.0.0.5:9000"), 1, 16, &[0]);
        assert_eq!(ask(at("127.0.0.5:9000"), TIMEOUT).as_deref(), Ok("plain\n"));
        assert_eq!(
            connect(at("127.0.0.6:9000"), TIMEOUT).unwrap_err(),
            Outcome::Refused
        );
        drop(plain);
        drop(spawner);
    });
}
