//! Steering follows the policy, shown deterministically at the library level: the test
//! learns the kernel's own hash choice for each client 4-tuple with no program attached,
//! then replays the same 4-tuples with the program.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use parsrv::{dataplane::reuseport::Steering, kernel, listeners::Listeners, spec::Transport};
use parsrv_common::reuseport::{policy, when_full, ProgramConfig};
use parsrv_integration_tests::{privileged, wait_for, Needs};
use socket2::{Domain, Socket, Type};

const SERVER: &str = "127.0.0.1:8080";
const BACKLOG: u32 = 4; // each socket holds BACKLOG + 1
const FIRST_PORT: u16 = 20000;
const PORTS: u16 = 80;

struct Harness {
    group: Listeners,
}

impl Harness {
    fn depths(&self) -> Vec<u32> {
        self.group
            .listeners()
            .iter()
            .map(|l| l.queue().unwrap().depth)
            .collect()
    }

    /// Connects from 127.0.0.1:`port` and returns the client and the socket index whose
    /// queue received the connection.
    fn connect_from(&self, port: u16) -> (Socket, usize) {
        let before = self.depths();
        let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        client.set_reuse_address(true).unwrap();
        let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        client.bind(&local.into()).unwrap();
        let server: SocketAddr = SERVER.parse().unwrap();
        client
            .connect_timeout(&server.into(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect from port {port}: {e}"));
        let mut landed = None;
        assert!(
            wait_for(Duration::from_secs(2), || {
                let now = self.depths();
                landed = (0..now.len()).find(|&i| now[i] > before[i]);
                landed.is_some()
            }),
            "connection from port {port} never reached an accept queue"
        );
        (client, landed.unwrap())
    }

    /// Accepts one queued connection on `index` and resets both ends, so the 4-tuple can
    /// be used again at once (no TIME_WAIT).
    fn clear(&self, client: Socket, index: usize) {
        let listener = self.group.listeners()[index].socket();
        let (accepted, _) = listener.accept().expect("a queued connection");
        client.set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        accepted.set_linger(Some(Duration::ZERO)).unwrap();
    }

    /// Connect from `port`, note where it landed, clear it.
    fn landing(&self, port: u16) -> usize {
        let (client, index) = self.connect_from(port);
        self.clear(client, index);
        index
    }
}

impl Harness {
    /// Four listeners; the kernel's own hash choice for each source port, learnt with no
    /// program; then the program attached with `redirect`.
    fn attached() -> (Harness, BTreeMap<u16, usize>, Steering) {
        let h = Harness {
            group: Listeners::bind(&[SERVER.parse().unwrap()], Transport::Tcp, 4, BACKLOG, 0)
                .unwrap(),
        };
        let hash_choice = (FIRST_PORT..FIRST_PORT + PORTS)
            .map(|p| (p, h.landing(p)))
            .collect();
        let mut steering = Steering::load(config(policy::REDIRECT), 1, None, None).unwrap();
        for (slot, listener) in (0..).zip(h.group.listeners()) {
            steering.register(slot, listener).unwrap();
        }
        steering.attach(&h.group.listeners()[0]).unwrap();
        (h, hash_choice, steering)
    }
}

fn config(policy: u32) -> ProgramConfig {
    ProgramConfig {
        offsets: kernel::kernel_offsets().unwrap(),
        policy,
        when_full: when_full::DROP,
        ..Default::default() // the generation is Steering's
    }
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn redirect_keeps_hash_choice_and_least_loaded_balances() {
    privileged(Needs::program(), || {
        // 1. No program: the kernel's hash choice for each source port. 2. Program
        //    attached, policy redirect, room everywhere: every connection keeps its hash
        //    choice.
        let (h, hash_choice, mut steering) = Harness::attached();
        let ports = FIRST_PORT..FIRST_PORT + PORTS;
        for port in ports.clone() {
            assert_eq!(h.landing(port), hash_choice[&port], "port {port} moved");
        }
        let selected: Vec<u64> = steering
            .slot_counters(4)
            .unwrap()
            .iter()
            .map(|c| c.selected)
            .collect();
        let expected: Vec<u64> = (0..4)
            .map(|i| hash_choice.values().filter(|&&c| c == i).count() as u64)
            .collect();
        assert_eq!(selected, expected, "per-slot selections");

        // 3. Make the busiest hash choice F full: connections hashed to F go to the next
        //    socket with the most room (all others are empty, so F+1: ties go to the first
        //    socket after the hash choice); the others keep their hash choice.
        let full = (0..4).max_by_key(|i| expected[*i]).unwrap();
        let f_ports: Vec<u16> = ports.clone().filter(|p| hash_choice[p] == full).collect();
        assert!(
            f_ports.len() > BACKLOG as usize + 2,
            "too few ports hash to {full}"
        );
        let (fill, rest) = f_ports.split_at(BACKLOG as usize + 1);
        let held: Vec<Socket> = fill
            .iter()
            .map(|&p| {
                let (client, index) = h.connect_from(p);
                assert_eq!(index, full);
                client
            })
            .collect();
        assert_eq!(h.depths()[full], BACKLOG + 1, "F is full");
        let before = steering.slot_counters(4).unwrap()[full];
        for &port in rest {
            assert_eq!(
                h.landing(port),
                (full + 1) % 4,
                "port {port} hashed to full {full}"
            );
        }
        for port in ports.clone().filter(|p| hash_choice[p] != full).take(10) {
            assert_eq!(h.landing(port), hash_choice[&port], "port {port}");
        }
        let after = steering.slot_counters(4).unwrap()[full];
        assert_eq!(
            after.redirected_away - before.redirected_away,
            rest.len() as u64
        );
        assert_eq!(
            after.selected, before.selected,
            "nothing went to the full socket"
        );
        for client in held {
            h.clear(client, full);
        }
        assert_eq!(
            steering.global_counters().unwrap().total(),
            0,
            "no fail-open"
        );

        // An uneven set of connections: 4 whose hash choice is socket A, 2 for socket B.
        let mut by_count: Vec<usize> = (0..4).collect();
        by_count.sort_by_key(|i| std::cmp::Reverse(expected[*i]));
        let (a, b) = (by_count[0], by_count[1]);
        let uneven: Vec<u16> = ports
            .clone()
            .filter(|p| hash_choice[p] == a)
            .take(4)
            .chain(ports.clone().filter(|p| hash_choice[p] == b).take(2))
            .collect();
        assert_eq!(uneven.len(), 6, "too few ports hash to {a} and {b}");

        // 4. Least-loaded, nobody accepting: every new connection goes to a socket with the
        //    fewest queued, so the queues stay level whatever the hash says. The first one
        //    (all empty) is a tie and keeps its hash choice.
        steering.set_config(config(policy::LEAST_LOADED)).unwrap();
        let mut held = Vec::new();
        for (n, &port) in uneven.iter().enumerate() {
            let (client, index) = h.connect_from(port);
            if n == 0 {
                assert_eq!(index, hash_choice[&port], "tie broken by hash");
            }
            let depths = h.depths();
            let spread = depths.iter().max().unwrap() - depths.iter().min().unwrap();
            assert!(
                spread <= 1,
                "least-loaded let queues drift apart: {depths:?}"
            );
            held.push((client, index));
        }
        assert_eq!(h.depths().iter().sum::<u32>(), 6);
        assert_eq!(*h.depths().iter().max().unwrap(), 2);
        for (client, index) in held {
            h.clear(client, index);
        }

        // 5. The same connections under redirect pile up where the hash puts them.
        steering.set_config(config(policy::REDIRECT)).unwrap();
        let held: Vec<_> = uneven.iter().map(|&p| h.connect_from(p)).collect();
        let mut by_hash = vec![0u32; 4];
        by_hash[a] = 4;
        by_hash[b] = 2;
        assert_eq!(h.depths(), by_hash);
        for (client, index) in held {
            h.clear(client, index);
        }
        Steering::detach(h.group.listeners()[0].socket()).unwrap();
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn two_choices_never_takes_a_full_socket_and_looks_at_all_when_both_choices_are_full() {
    privileged(Needs::program(), || {
        let (h, hash_choice, mut steering) = Harness::attached();
        let ports = FIRST_PORT..FIRST_PORT + PORTS;

        // Sockets 0, 1 and 2 full (redirect keeps each hash choice while it has room);
        // socket 3 empty.
        let mut held = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        for socket in 0..3 {
            let mine: Vec<u16> = ports
                .clone()
                .filter(|p| hash_choice[p] == socket)
                .take(BACKLOG as usize + 1)
                .collect();
            assert_eq!(
                mine.len(),
                BACKLOG as usize + 1,
                "too few ports hash to {socket}"
            );
            for port in mine {
                let (client, index) = h.connect_from(port);
                assert_eq!(index, socket);
                used.insert(port);
                held.push((client, index));
            }
        }
        assert_eq!(h.depths(), [BACKLOG + 1, BACKLOG + 1, BACKLOG + 1, 0]);

        // Two choices: a connection whose hash choice is full goes to its random other if
        // that has room, and when the random other is full too, to the one socket with room:
        // whatever the hash and the draw, every one lands on socket 3, none is dropped.
        steering.set_config(config(policy::TWO_CHOICES)).unwrap();
        let before = steering.slot_counters(4).unwrap();
        let rest: Vec<u16> = ports
            .clone()
            .filter(|p| !used.contains(p) && hash_choice[p] != 3)
            .take(BACKLOG as usize + 1)
            .collect();
        for &port in &rest {
            let (client, index) = h.connect_from(port);
            assert_eq!(index, 3, "port {port} (hash choice {})", hash_choice[&port]);
            held.push((client, index));
        }
        let after = steering.slot_counters(4).unwrap();
        assert_eq!(after[3].selected - before[3].selected, rest.len() as u64);
        for full in 0..3 {
            assert_eq!(after[full].selected, before[full].selected, "socket {full}");
        }
        assert_eq!(steering.global_counters().unwrap().total(), 0);
        for (client, index) in held {
            h.clear(client, index);
        }
        Steering::detach(h.group.listeners()[0].socket()).unwrap();
    });
}
