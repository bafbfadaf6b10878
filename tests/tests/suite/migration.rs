//! Removing a socket from the group loses no queued connection: with the program (loaded
//! as SELECT_OR_MIGRATE) attached, shutting a listener down migrates its queue to a live
//! socket with room; without it (control, same test) the same step resets them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use parsrv::{dataplane::reuseport::Steering, kernel, listeners::Listeners, spec::Transport};
use parsrv_common::reuseport::{policy, when_full, ProgramConfig};
use parsrv_integration_tests::{addr, privileged, wait_for, Feature, Needs, NetCounters};

const QUEUED: usize = 6;

/// Connects until socket `index` of `group` holds QUEUED connections (the others' are
/// accepted and dropped); returns the clients queued there.
fn queue_on(group: &Listeners, index: usize, addr: SocketAddr) -> Vec<TcpStream> {
    let mut queued = Vec::new();
    for _ in 0..200 {
        if queued.len() == QUEUED {
            break;
        }
        let before = group.listeners()[index].queue().unwrap().depth;
        let client = TcpStream::connect(addr).unwrap();
        assert!(wait_for(Duration::from_secs(2), || group
            .listeners()
            .iter()
            .map(|l| l.queue().unwrap().depth)
            .sum::<u32>()
            > 0));
        if group.listeners()[index].queue().unwrap().depth > before {
            queued.push(client);
        } else {
            for (i, l) in group.listeners().iter().enumerate() {
                if i != index {
                    while l.socket().accept().is_ok() {}
                }
            }
        }
    }
    assert_eq!(queued.len(), QUEUED);
    queued
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn shutting_a_listener_down_migrates_its_queue_with_the_program_and_resets_it_without() {
    privileged(Needs::program().and(Feature::TcpMigrateReq), || {
        let addr: SocketAddr = addr();
        let group = Listeners::bind(&[addr], Transport::Tcp, 2, 16, 0).unwrap();
        let mut steering = Steering::load(
            ProgramConfig {
                offsets: kernel::kernel_offsets().unwrap(),
                policy: policy::REDIRECT,
                when_full: when_full::DROP,
                ..Default::default()
            },
            1,
            None,
            None,
        )
        .unwrap();
        for (slot, listener) in (0..).zip(group.listeners()) {
            steering.register(slot, listener).unwrap();
        }
        steering.attach(&group.listeners()[0]).unwrap();

        let mut clients = queue_on(&group, 1, addr);
        let before = NetCounters::read();
        group.listeners()[1]
            .socket()
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        let kernel = before.delta(&NetCounters::read());
        eprintln!("with the program: {kernel:?}");
        assert_eq!(kernel.migrate_req_success, QUEUED as u64);
        assert_eq!(kernel.migrate_req_failure, 0);
        assert_eq!(kernel.out_rsts, 0);
        assert_eq!(group.listeners()[0].queue().unwrap().depth, QUEUED as u32);
        assert_eq!(
            steering.slot_counters(2).unwrap()[0].migrated_in,
            QUEUED as u64
        );
        // Each migrated connection works end to end.
        for client in &mut clients {
            let (served, _) = group.listeners()[0].socket().accept().unwrap();
            served.set_nonblocking(false).unwrap();
            let mut served: TcpStream = served.into();
            client.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            served.read_exact(&mut buf).unwrap();
            served.write_all(&buf).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            client.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
        }
        drop(steering);
        drop(group);

        // Control: the same with no program attached (and the kernel's own hash migration
        // off, its default): the queue is reset.
        let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let group = Listeners::bind(&[addr], Transport::Tcp, 2, 16, 0).unwrap();
        let mut clients = queue_on(&group, 1, addr);
        let before = NetCounters::read();
        group.listeners()[1]
            .socket()
            .shutdown(std::net::Shutdown::Read)
            .unwrap();
        let kernel = before.delta(&NetCounters::read());
        eprintln!("without: {kernel:?}");
        assert_eq!(kernel.migrate_req_success, 0);
        assert_eq!(kernel.out_rsts, QUEUED as u64);
        let mut reset = 0;
        for client in &mut clients {
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            if matches!(client.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            {
                reset += 1;
            }
        }
        assert_eq!(reset, QUEUED);
    });
}
