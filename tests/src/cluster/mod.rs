//! Several hosts behind a router, as network namespaces of the test's own (inside its
//! [`isolated`] namespaces, so their names, /run/netns and bpffs pins are the test's only):
//!
//! ```text
//!  clients (198.51.100.10-..) --- router --- br0 (192.0.2.1/24) --- host 1 (192.0.2.11)
//!        198.51.100.0/24        203.0.113.10/32 via ECMP     +------ host 2 (192.0.2.12)
//!                                                            +------ host 3 (192.0.2.13)
//! ```
//!
//! Every host has the service address 203.0.113.10 on its lo and runs a group on
//! 203.0.113.10:8080 (echo handlers); the router's route to it is a multipath route over
//! the hosts with an L4 hash (`fib_multipath_hash_policy=1`), as routers fed by BGP do.
//! Only documentation ranges, never routed out of these namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::*;

mod agents;
mod clients;
mod routes;

pub use clients::{Ended, LongLived, LOAD_LIMIT, ROUND_EVERY};

pub const SERVICE: &str = "203.0.113.10";
pub const SERVICE_PORT: u16 = 8080;
pub const CLUSTER: &str = "web";
/// The agents' `peer_timeout_ms`: a peer silent this long is gone. Above the product's
/// default (1.5 s), against starved emulated guests (in CI a VM shares 2 CPUs with another
/// VM and the native tests). What the tests show does not depend on how soon a dead host is
/// noticed, only that it is.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(3000);

/// How often the cluster tests look again at what they wait for. Most looks run a process
/// (`parsrv cluster status`, `ip route`), which under emulation costs a third of a second
/// of the VM's CPU (40 `parsrv` runs took 13 s more in a 6.12 VM than here): looked at
/// every 10 ms, the looks took the CPU from the agents the test waits on.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// [`wait_for`] for the cluster tests: looks every [`POLL_EVERY`].
pub fn wait_polling(limit: Duration, done: impl FnMut() -> bool) -> bool {
    wait_for_every(limit, POLL_EVERY, done)
}

/// How long a spawner or an agent may take to answer after it starts before the harness
/// calls it hung: a liveness bound, not a speed check. Natively they answer within 0.3 s;
/// under emulation, beside the other hosts' processes, it took 2-20 s.
const START_WITHIN: Duration = Duration::from_secs(60);

pub struct ClusterHost {
    pub id: u16,
    pub ns: String,
    pub addr: Ipv4Addr,
    pub run_dir: PathBuf,
    pub config: PathBuf,
    pub spawner: Option<Child>,
    pub agent: Option<Child>,
}

pub struct Topology {
    /// BIRD daemons started by [`Topology::start_bird`].
    birds: Vec<Child>,
    pub router: String,
    pub clients: String,
    pub client_addrs: Vec<Ipv4Addr>,
    pub hosts: Vec<ClusterHost>,
    dir: PathBuf,
}

/// Runs `ip ARGS` and fails the test if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(ns: &str, key: &str, value: &str) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()
        .expect("running sysctl");
    assert!(out.status.success(), "sysctl {key} in {ns}: {out:?}");
}

impl Topology {
    /// Builds the router, `hosts` hosts (ids 1..) and a client namespace with `clients`
    /// addresses. Nothing runs on the hosts yet.
    pub fn build(hosts: u16, clients: usize) -> Topology {
        let tag = std::process::id();
        let router = format!("r{tag}");
        let client_ns = format!("c{tag}");
        let dir = std::env::temp_dir().join(format!("parsrv-cluster-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for ns in [&router, &client_ns] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &router, "link", "add", "r0", "type", "veth", "peer", "name", "c0", "netns",
            &client_ns,
        ]);
        ip(&["-n", &router, "addr", "add", "198.51.100.1/24", "dev", "r0"]);
        ip(&["-n", &router, "link", "set", "r0", "up"]);
        ip(&["-n", &router, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &router, "addr", "add", "192.0.2.1/24", "dev", "br0"]);
        ip(&["-n", &router, "link", "set", "br0", "up"]);
        sysctl(&router, "net.ipv4.ip_forward", "1");
        sysctl(&router, "net.ipv4.fib_multipath_hash_policy", "1");
        let client_addrs: Vec<Ipv4Addr> = (0..clients)
            .map(|i| Ipv4Addr::new(198, 51, 100, 10 + i as u8))
            .collect();
        for addr in &client_addrs {
            ip(&[
                "-n",
                &client_ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "c0",
            ]);
        }
        ip(&["-n", &client_ns, "link", "set", "c0", "up"]);
        ip(&[
            "-n",
            &client_ns,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        let mut topology = Topology {
            birds: Vec::new(),
            router,
            clients: client_ns,
            client_addrs,
            hosts: Vec::new(),
            dir,
        };
        // The peers speak mutual TLS, with certificates made as docs/cluster.md says.
        let ids: Vec<String> = (1..=hosts).map(|id| id.to_string()).collect();
        topology.make_certs(&ids.join(","), &topology.certs_dir());
        for id in 1..=hosts {
            topology.add_host(id, hosts);
        }
        topology
    }

    /// Where [`Topology::build`] keeps the cluster's CA and the hosts' certificates.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `parsrv cluster certs` for `hosts` (e.g. "1,2") into `dir`.
    pub fn make_certs(&self, hosts: &str, dir: &Path) {
        let out = Command::new(parsrv_bin())
            .args([
                "cluster", "certs", "--name", CLUSTER, "--hosts", hosts, "--dir",
            ])
            .arg(dir)
            .output()
            .expect("running parsrv cluster certs");
        assert!(out.status.success(), "parsrv cluster certs: {out:?}");
    }

    /// [`Topology::build`], then every host's group and agent, the route over all hosts, and
    /// every agent ready.
    pub fn serving(hosts: u16, clients: usize) -> Topology {
        let mut topology = Topology::build(hosts, clients);
        let ids: Vec<u16> = (1..=hosts).collect();
        for &id in &ids {
            topology.start_group(id);
        }
        topology.route_over(&ids);
        for &id in &ids {
            topology.start_agent(id);
        }
        topology.wait_ready(&ids);
        topology
    }

    fn add_host(&mut self, id: u16, hosts: u16) {
        let ns = format!("h{id}-{}", std::process::id());
        let addr = Ipv4Addr::new(192, 0, 2, 10 + id as u8);
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let port = format!("rh{id}");
        ip(&[
            "-n",
            &self.router,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&["-n", &self.router, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &self.router, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{SERVICE}/32"),
            "dev",
            "lo",
        ]);
        ip(&["-n", &ns, "route", "add", "default", "via", "192.0.2.1"]);
        let run_dir = self.dir.join(format!("run-{id}"));
        let config = self.dir.join(format!("host-{id}.toml"));
        let peers: Vec<String> = (1..=hosts)
            .filter(|&p| p != id)
            .map(|p| format!("{{ host = {p}, address = \"192.0.2.{}:7946\" }}", 10 + p))
            .collect();
        std::fs::write(
            &config,
            format!(
                r#"[[group]]
name = "web{id}"
listen = "{SERVICE}:{SERVICE_PORT}"
handler = "echo"
handlers = 2

[cluster]
name = "{CLUSTER}"
host = {id}
address = "{addr}:7946"
interface = "eth0"
service = "{SERVICE}:{SERVICE_PORT}"
group = "web{id}"
peers = [{}]
peer_timeout_ms = {peer_timeout_ms}
metrics = "{addr}:9101"
tls = {{ ca = "{certs}/ca.pem", cert = "{certs}/host-{id}.pem", key = "{certs}/host-{id}.key" }}
"#,
                peers.join(", "),
                certs = self.certs_dir().display(),
                peer_timeout_ms = PEER_TIMEOUT.as_millis(),
            ),
        )
        .unwrap();
        self.hosts.push(ClusterHost {
            id,
            ns,
            addr,
            run_dir,
            config,
            spawner: None,
            agent: None,
        });
    }

    pub fn host(&self, id: u16) -> &ClusterHost {
        &self.hosts[id as usize - 1]
    }

    fn host_mut(&mut self, id: u16) -> &mut ClusterHost {
        &mut self.hosts[id as usize - 1]
    }

    /// `parsrv ARGS` in host `id`'s namespace and run directory.
    pub fn parsrv(&self, id: u16, args: &[&str]) -> Command {
        let host = self.host(id);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", host.ns))
            .arg("--")
            .arg(parsrv_bin())
            .args(args)
            .env("PARSRV_RUN_DIR", &host.run_dir);
        command
    }

    /// Output of `parsrv ARGS` in host `id`: (exit code, stdout, stderr).
    pub fn parsrv_output(&self, id: u16, args: &[&str]) -> (i32, String, String) {
        let out = self.parsrv(id, args).output().expect("running parsrv");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts host `id`'s group, and waits until it answers.
    pub fn start_group(&mut self, id: u16) {
        let config = self.host(id).config.clone();
        let log = File::create(self.dir.join(format!("spawner-{id}.log"))).unwrap();
        let child = self
            .parsrv(id, &["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting parsrv run");
        self.host_mut(id).spawner = Some(child);
        let name = format!("web{id}");
        assert!(
            wait_polling(START_WITHIN, || self
                .parsrv_output(id, &["status", &name, "--json"])
                .0
                == 0),
            "host {id}'s group did not start: {}",
            self.log(&format!("spawner-{id}.log"))
        );
    }

    /// Appends `line` to every host's config file (its `[cluster]` section is the last).
    pub fn add_to_configs(&self, line: &str) {
        for host in &self.hosts {
            let mut text = std::fs::read_to_string(&host.config).unwrap();
            text += line;
            text += "\n";
            std::fs::write(&host.config, text).unwrap();
        }
    }

    /// Closes (SOCK_DESTROY, `ss -K`) every established connection to the service on every
    /// host, and checks none is left. A control whose route change broke connections leaves
    /// their server ends established on the host they were on (the client's FIN and RST
    /// went to another host): a later client that gets the same port would seem to be
    /// served on two hosts.
    pub fn close_service_connections(&self) {
        for host in &self.hosts {
            let out = Command::new("ip")
                .args(["netns", "exec", &host.ns, "ss", "-K", "-t", "-n"])
                .args([
                    "state",
                    "established",
                    "sport",
                    "=",
                    &format!(":{SERVICE_PORT}"),
                ])
                .output()
                .expect("running ss");
            assert!(
                out.status.success(),
                "ss -K in host {}: {}",
                host.id,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let left = self.connection_hosts();
        assert!(left.is_empty(), "connections left after ss -K: {left:?}");
    }

    /// Where each established connection to the service is: (client address, client
    /// port) -> host (read in each host's namespace).
    pub fn connection_hosts(&self) -> BTreeMap<(Ipv4Addr, u16), u16> {
        let mut servers = BTreeMap::new();
        for host in &self.hosts {
            // Read from a thread in the host's namespace (thread-self: /proc/net is the
            // process's), not by running `ip netns exec cat`: a process costs a VM's CPU.
            let table = self.in_host(host.id, || {
                std::fs::read_to_string("/proc/thread-self/net/tcp").expect("reading net/tcp")
            });
            let local = format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(SERVICE.parse::<Ipv4Addr>().unwrap().octets()),
                SERVICE_PORT
            );
            for line in table.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() > 3 && f[1] == local && f[3] == "01" {
                    let (addr, port) = f[2].split_once(':').unwrap();
                    let addr = u32::from_str_radix(addr, 16).unwrap();
                    let port = u16::from_str_radix(port, 16).unwrap();
                    servers.insert((Ipv4Addr::from(addr.to_ne_bytes()), port), host.id);
                }
            }
        }
        servers
    }

    /// Programs attached to host `id`'s eth0 ingress by tcx (read in its namespace).
    pub fn tcx_programs(&self, id: u16) -> usize {
        self.in_host(id, || {
            aya::programs::SchedClassifier::query_tcx("eth0", aya::programs::TcAttachType::Ingress)
                .map(|(_, programs)| programs.len())
                .unwrap_or(0)
        })
    }

    /// `GET path` from host `id`'s agent's metrics endpoint (from the router): its status
    /// code and body.
    pub fn scrape(&self, id: u16, path: &str) -> (u16, String) {
        let target = SocketAddr::new(self.host(id).addr.into(), 9101);
        let path = path.to_owned();
        in_netns(&self.router, move || {
            get_page(target, &path, Duration::from_secs(3)).expect("the agent's endpoint")
        })
    }

    /// Host `id`'s config file, for a test to change.
    pub fn config_text(&self, id: u16) -> String {
        std::fs::read_to_string(&self.host(id).config).unwrap()
    }

    /// Writes a config file beside the hosts' and returns its path.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `f` on a thread in host `id`'s network namespace.
    pub fn in_host<T: Send + 'static>(&self, id: u16, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.host(id).ns, f)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// What a failure needs to be explained, read from the kernel and the agents: the
    /// router's route and neighbours; per host, its agent's status (peers, table size,
    /// the dispatcher's counters) and its service connections with their TCP state
    /// (retransmissions, back-off, unacknowledged segments); the clients' view of theirs.
    pub fn network_state(&self) -> String {
        let run = |ns: &str, args: &[&str]| -> String {
            let out = Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .output();
            match out {
                Ok(out) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => format!("{e}\n"),
            }
        };
        let service_port = format!(":{SERVICE_PORT}");
        let mut state = format!(
            "router: route\n{}router: neighbours\n{}",
            run(
                &self.router,
                &["ip", "route", "show", &format!("{SERVICE}/32")]
            ),
            run(&self.router, &["ip", "neigh", "show"]),
        );
        for host in &self.hosts {
            // Not `cluster_status`: this runs while a test panics, where a second panic
            // aborts.
            let (_, status, error) =
                self.parsrv_output(host.id, &["cluster", "status", CLUSTER, "--json"]);
            let status = format!("{}{error}", status.trim_end());
            state += &format!(
                "host {}: cluster status\n{status}\nhost {}: service connections\n{}",
                host.id,
                host.id,
                run(&host.ns, &["ss", "-tnio", "sport", "=", &service_port]),
            );
        }
        state += &format!(
            "clients: connections to the service\n{}",
            run(&self.clients, &["ss", "-tnio", "dport", "=", &service_port])
        );
        state
    }

    /// Every host's agent and spawner log.
    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .map(|h| {
                format!(
                    "--- agent {}:\n{}--- spawner {}:\n{}",
                    h.id,
                    self.log(&format!("agent-{}.log", h.id)),
                    h.id,
                    self.log(&format!("spawner-{}.log", h.id))
                )
            })
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // A failing test keeps every agent's and spawner's log in its output (the
        // directory is removed below).
        if std::thread::panicking() {
            eprintln!(
                "--- logs of the cluster's hosts:\n{}--- the network as the failure left it:\n{}\
                 --- end of those logs",
                self.logs(),
                self.network_state()
            );
        }
        let ids: Vec<u16> = self.hosts.iter().map(|h| h.id).collect();
        for id in ids {
            let _ = self.stop_agent(id);
            if let Some(mut spawner) = self.host_mut(id).spawner.take() {
                send_signal(spawner.id(), libc::SIGTERM);
                let _ = wait_child(&mut spawner, Duration::from_secs(10));
            }
        }
        for bird in &mut self.birds {
            send_signal(bird.id(), libc::SIGTERM);
            let _ = wait_child(bird, Duration::from_secs(5));
        }
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).status();
        }
        for ns in [&self.router, &self.clients] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread of its own in network namespace `ns` (a name under /run/netns).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        nix::sched::setns(
            File::open(path).unwrap(),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: a signal to a process this test started.
    unsafe { libc::kill(pid as i32, signal) };
}

fn signal_group(pid: u32, signal: i32) {
    // SAFETY: a signal to the process group of a process this test started (it leads it).
    unsafe { libc::kill(-(pid as i32), signal) };
}

/// Waits up to `limit` for `child` to end, then kills it; says whether it ended by itself.
fn wait_child(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
