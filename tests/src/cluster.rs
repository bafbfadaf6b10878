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

pub const SERVICE: &str = "203.0.113.10";
pub const SERVICE_PORT: u16 = 8080;
pub const CLUSTER: &str = "web";

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
peer_timeout_ms = 1000
metrics = "{addr}:9101"
tls = {{ ca = "{certs}/ca.pem", cert = "{certs}/host-{id}.pem", key = "{certs}/host-{id}.key" }}
"#,
                peers.join(", "),
                certs = self.certs_dir().display(),
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
            wait_for(START_WITHIN, || self
                .parsrv_output(id, &["status", &name, "--json"])
                .0
                == 0),
            "host {id}'s group did not start: {}",
            self.log(&format!("spawner-{id}.log"))
        );
    }

    /// Starts host `id`'s agent (it loads and attaches the dispatcher).
    pub fn start_agent(&mut self, id: u16) {
        let config = self.host(id).config.clone();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("agent-{id}.log")))
            .unwrap();
        let child = self
            .parsrv(
                id,
                &["cluster", "run", "--config", config.to_str().unwrap()],
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting parsrv cluster run");
        let pid = child.id();
        self.host_mut(id).agent = Some(child);
        let mut last = (0, String::new(), String::new());
        let answered = wait_for(START_WITHIN, || {
            last = self.parsrv_output(id, &["cluster", "status", CLUSTER, "--json"]);
            last.0 == 0
        });
        // Where each of the agent's threads waits, if it is alive: a hang names its place.
        let waits = || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            Some(
                tasks
                    .flatten()
                    .map(|task| {
                        let read = |f: &str| {
                            std::fs::read_to_string(task.path().join(f)).unwrap_or_default()
                        };
                        format!(
                            "{} {} wchan={} stack: {}",
                            task.file_name().to_string_lossy(),
                            read("comm").trim(),
                            read("wchan"),
                            read("stack").replace('\n', " | ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        };
        // And its user-space backtrace, where gdb is installed (a spinning agent is in no
        // kernel wait).
        let backtrace = || {
            Command::new("gdb")
                .args([
                    "-p",
                    &pid.to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt 30",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " | "))
                .unwrap_or_default()
        };
        if !answered {
            eprintln!("host {id}'s agent (pid {pid}), waits: {:?}", waits());
            eprintln!("host {id}'s agent (pid {pid}), backtrace: {}", backtrace());
        }
        assert!(
            answered,
            "host {id}'s agent did not answer; the last `parsrv cluster status` exited {} \
             saying {:?} {:?}; the agent (pid {pid}) waits: {:?}; its log: {}",
            last.0,
            last.1,
            last.2,
            waits(),
            self.log(&format!("agent-{id}.log"))
        );
    }

    /// Waits until every agent in `ids` is ready and sees the others of `ids` ready.
    pub fn wait_ready(&self, ids: &[u16]) {
        let ready = || {
            ids.iter().all(|&id| {
                self.cluster_status(id).is_some_and(|s| {
                    s["state"] == "ready"
                        && s["peers"].as_array().unwrap().iter().all(|p| {
                            !ids.contains(&(p["host"].as_u64().unwrap() as u16))
                                || p["state"] == "ready"
                        })
                })
            })
        };
        assert!(
            wait_for(Duration::from_secs(20), ready),
            "the agents did not all get ready: {:?}",
            ids.iter()
                .map(|&id| self.cluster_status(id))
                .collect::<Vec<_>>()
        );
    }

    pub fn cluster_status(&self, id: u16) -> Option<serde_json::Value> {
        let (code, out, _) = self.parsrv_output(id, &["cluster", "status", CLUSTER, "--json"]);
        (code == 0).then(|| serde_json::from_str(&out).expect("status JSON"))
    }

    /// Stops host `id`'s agent with SIGTERM and waits for it.
    /// SIGTERMs host `id`'s agent and waits 10 s for it to end, then SIGKILLs it; says
    /// whether it ended by itself (false: it needed the SIGKILL, which leaves its
    /// dispatcher attached).
    pub fn stop_agent(&mut self, id: u16) -> bool {
        match self.host_mut(id).agent.take() {
            Some(mut agent) => {
                send_signal(agent.id(), libc::SIGTERM);
                wait_child(&mut agent, Duration::from_secs(10))
            }
            None => true,
        }
    }

    /// SIGKILLs host `id`'s agent.
    pub fn kill_agent(&mut self, id: u16) {
        if let Some(mut agent) = self.host_mut(id).agent.take() {
            send_signal(agent.id(), libc::SIGKILL);
            let _ = agent.wait();
        }
    }

    /// The host as a machine that died: its link to the segment goes down, and its agent
    /// and group are killed.
    pub fn kill_host(&mut self, id: u16) {
        let router = self.router.clone();
        ip(&["-n", &router, "link", "set", &format!("rh{id}"), "down"]);
        self.kill_agent(id);
        let handlers: Vec<u32> = self
            .parsrv_output(id, &["status", &format!("web{id}"), "--json"])
            .1
            .parse::<serde_json::Value>()
            .ok()
            .and_then(|s| {
                s["handlers"].as_array().map(|hs| {
                    hs.iter()
                        .filter_map(|h| h["pid"].as_u64())
                        .map(|p| p as u32)
                        .collect()
                })
            })
            .unwrap_or_default();
        if let Some(mut spawner) = self.host_mut(id).spawner.take() {
            send_signal(spawner.id(), libc::SIGKILL);
            let _ = spawner.wait();
        }
        // Each handler leads a process group of its own.
        for pid in handlers {
            signal_group(pid, libc::SIGKILL);
        }
    }

    /// The router's route to the service: a classic multipath route over `ids`.
    pub fn route_over(&self, ids: &[u16]) {
        let mut args: Vec<String> = [
            "-n",
            &self.router,
            "route",
            "replace",
            &format!("{SERVICE}/32"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for id in ids {
            args.extend([
                "nexthop".into(),
                "via".into(),
                self.host(*id).addr.to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&args);
    }

    /// Runs BIRD on the router and on every host, as a BGP fabric would: each host's BIRD
    /// announces the service address (a static route, off until the agent's `ready` command
    /// enables it; `draining` disables it), the router's BIRD puts what it learns into the
    /// kernel as one multipath route (`merge paths`). Must be called before the agents start
    /// (it adds the commands to the hosts' config files).
    pub fn start_bird(&mut self) {
        let router_conf = self.dir.join("bird-router.conf");
        let mut conf = String::from(
            "router id 192.0.2.1;\nprotocol device {}\n\
             protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n",
        );
        for host in &self.hosts {
            conf += &format!(
                "protocol bgp h{id} {{ local 192.0.2.1 as 65000; neighbor {addr} as 65001; \
                 hold time 3; keepalive time 1; connect retry time 1; \
                 ipv4 {{ import all; export none; }}; }}\n",
                id = host.id,
                addr = host.addr
            );
        }
        std::fs::write(&router_conf, conf).unwrap();
        let router = self.router.clone();
        self.spawn_bird(&router, &router_conf, "router");
        for index in 0..self.hosts.len() {
            let (id, addr, ns) = {
                let h = &self.hosts[index];
                (h.id, h.addr, h.ns.clone())
            };
            let conf_path = self.dir.join(format!("bird-{id}.conf"));
            std::fs::write(
                &conf_path,
                format!(
                    "router id {addr};\nprotocol device {{}}\n\
                     protocol static service {{ ipv4; route {SERVICE}/32 blackhole; disabled yes; }}\n\
                     protocol bgp uplink {{ local {addr} as 65001; neighbor 192.0.2.1 as 65000; \
                     hold time 3; keepalive time 1; connect retry time 1; \
                     ipv4 {{ import none; export where proto = \"service\"; next hop self; }}; }}\n"
                ),
            )
            .unwrap();
            let socket = self.spawn_bird(&ns, &conf_path, &format!("h{id}"));
            let hooks = format!(
                "ready = [\"birdc\", \"-s\", \"{socket}\", \"enable\", \"service\"]\n\
                 draining = [\"birdc\", \"-s\", \"{socket}\", \"disable\", \"service\"]\n",
                socket = socket.display()
            );
            let config = self.hosts[index].config.clone();
            let mut text = std::fs::read_to_string(&config).unwrap();
            text += &hooks;
            std::fs::write(&config, text).unwrap();
        }
    }

    fn spawn_bird(&mut self, ns: &str, conf: &std::path::Path, name: &str) -> PathBuf {
        let socket = self.dir.join(format!("bird-{name}.ctl"));
        let log = File::create(self.dir.join(format!("bird-{name}.log"))).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "bird", "-f", "-c"])
            .arg(conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting bird (apt package bird2; `cargo xtask setup` installs it)");
        self.birds.push(child);
        let answers = || {
            Command::new("birdc")
                .arg("-s")
                .arg(&socket)
                .args(["show", "status"])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"BIRD"))
        };
        assert!(
            wait_for(Duration::from_secs(10), answers),
            "bird in {ns} did not start: {}",
            self.log(&format!("bird-{name}.log"))
        );
        socket
    }

    /// The next hops of the router's route to the service, as the kernel has it.
    pub fn router_next_hops(&self) -> BTreeSet<Ipv4Addr> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.router,
                "-4",
                "route",
                "show",
                &format!("{SERVICE}/32"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect()
    }

    /// What each BIRD says about its protocols, and its log.
    pub fn bird_state(&self) -> String {
        let mut names = vec!["router".to_owned()];
        names.extend(self.hosts.iter().map(|h| format!("h{}", h.id)));
        names
            .iter()
            .map(|name| {
                let out = Command::new("birdc")
                    .arg("-s")
                    .arg(self.dir.join(format!("bird-{name}.ctl")))
                    .args(["show", "protocols"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                format!(
                    "--- bird {name}:\n{out}{}",
                    self.log(&format!("bird-{name}.log"))
                )
            })
            .collect()
    }

    /// Waits until the router routes the service over exactly the hosts `ids`.
    pub fn wait_route(&self, ids: &[u16]) {
        let want: BTreeSet<Ipv4Addr> = ids.iter().map(|&id| self.host(id).addr).collect();
        assert!(
            wait_for(Duration::from_secs(15), || self.router_next_hops() == want),
            "the router's route is over {:?}, not {want:?}\n{}{}",
            self.router_next_hops(),
            self.logs(),
            self.bird_state()
        );
    }

    /// The router's route to the service through a resilient nexthop group over `ids`
    /// (64 buckets; only the buckets of a removed host move).
    pub fn resilient_over(&self, ids: &[u16]) {
        for host in &self.hosts {
            let id = host.id.to_string();
            let addr = host.addr.to_string();
            ip(&[
                "-n",
                &self.router,
                "nexthop",
                "replace",
                "id",
                &id,
                "via",
                &addr,
                "dev",
                "br0",
            ]);
        }
        let group: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let group = group.join("/");
        ip(&[
            "-n",
            &self.router,
            "nexthop",
            "replace",
            "id",
            "100",
            "group",
            &group,
            "type",
            "resilient",
            "buckets",
            "64",
            "idle_timer",
            "5",
            "unbalanced_timer",
            "0",
        ]);
        ip(&[
            "-n",
            &self.router,
            "route",
            "replace",
            &format!("{SERVICE}/32"),
            "nhid",
            "100",
        ]);
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
            let out = Command::new("ip")
                .args(["netns", "exec", &host.ns, "cat", "/proc/net/tcp"])
                .output()
                .unwrap();
            let local = format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(SERVICE.parse::<Ipv4Addr>().unwrap().octets()),
                SERVICE_PORT
            );
            for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
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
                "--- logs of the cluster's hosts:\n{}--- end of those logs",
                self.logs()
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

/// How one long-lived connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Still exchanging data when the test stopped it.
    Alive,
    /// Never connected.
    NoConnect(String),
    /// Broke: an error or an echo that did not come back in time.
    Broken(String),
}

/// How long a spawner or an agent may take to answer after it starts before the harness
/// calls it hung: a liveness bound, not a speed check. Natively they answer within 0.3 s;
/// under emulation, beside the other hosts' processes, it took 2-20 s.
const START_WITHIN: Duration = Duration::from_secs(60);

/// How often each long-lived connection sends a line: six round trips per 600-ms route
/// change, so a change that breaks a connection shows before the next. (At 30 ms, 150
/// connections kept both CPUs of an emulated VM busy, and an agent starting beside them
/// took more than 20 s.)
pub const ROUND_EVERY: Duration = Duration::from_millis(100);

/// Long-lived connections from many clients, each sending a line and reading its echo
/// every [`ROUND_EVERY`] until stopped (bounded: `limit`).
pub struct LongLived {
    stop: Arc<AtomicBool>,
    /// Per connection: close it (gracefully) now.
    closes: Vec<Arc<AtomicBool>>,
    threads: Vec<thread::JoinHandle<Ended>>,
    /// Round trips done, per connection.
    pub rounds: Vec<Arc<AtomicU64>>,
    /// Each connection's client port (0 until connected).
    ports: Vec<Arc<AtomicU32>>,
    pub clients: Vec<Ipv4Addr>,
    broken: Arc<Mutex<Vec<(usize, String)>>>,
}

impl LongLived {
    /// Opens `per_client` connections from each of `clients` (addresses of the topology's
    /// client namespace), all at once, and waits until all are established (or failed).
    pub fn open(
        topology: &Topology,
        clients: &[Ipv4Addr],
        per_client: usize,
        limit: Duration,
    ) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut rounds = Vec::new();
        let mut closes = Vec::new();
        let mut ports = Vec::new();
        let mut connection_clients = Vec::new();
        let connected = Arc::new(AtomicU64::new(0));
        let service: SocketAddr = format!("{SERVICE}:{SERVICE_PORT}").parse().unwrap();
        for (index, client) in clients
            .iter()
            .flat_map(|c| std::iter::repeat_n(*c, per_client))
            .enumerate()
        {
            let ns = format!("/run/netns/{}", topology.clients);
            let (stop, broken, count, connected) = (
                stop.clone(),
                broken.clone(),
                Arc::new(AtomicU64::new(0)),
                connected.clone(),
            );
            let close = Arc::new(AtomicBool::new(false));
            closes.push(close.clone());
            let port = Arc::new(AtomicU32::new(0));
            ports.push(port.clone());
            rounds.push(count.clone());
            connection_clients.push(client);
            threads.push(thread::spawn(move || {
                let netns = File::open(&ns).unwrap();
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let ended = converse(
                    client,
                    service,
                    [&stop, &close],
                    &count,
                    &port,
                    &connected,
                    limit,
                );
                if let Ended::Broken(why) = &ended {
                    broken.lock().unwrap().push((index, why.clone()));
                }
                ended
            }));
        }
        let total = threads.len() as u64;
        wait_for(Duration::from_secs(30), || {
            connected.load(Ordering::SeqCst) >= total
        });
        LongLived {
            stop,
            closes,
            threads,
            rounds,
            ports,
            clients: connection_clients,
            broken,
        }
    }

    /// Closes connection `index` (its client's side, gracefully); the others go on.
    pub fn close(&self, index: usize) {
        self.closes[index].store(true, Ordering::SeqCst);
    }

    /// Each client's server hosts, by where its connections of this load are.
    pub fn hosts_of_clients(&self, topology: &Topology) -> BTreeMap<Ipv4Addr, BTreeSet<u16>> {
        let hosts = topology.connection_hosts();
        let mut by_client: BTreeMap<Ipv4Addr, BTreeSet<u16>> = BTreeMap::new();
        for (client, port) in self.clients.iter().zip(&self.ports) {
            let port = port.load(Ordering::SeqCst) as u16;
            if let Some(host) = hosts.get(&(*client, port)) {
                by_client.entry(*client).or_default().insert(*host);
            }
        }
        by_client
    }

    /// Connection `index`'s client port (0 until it connected).
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index].load(Ordering::SeqCst) as u16
    }

    /// The connections broken so far, by index.
    pub fn broken_indices(&self) -> BTreeSet<usize> {
        self.broken
            .lock()
            .unwrap()
            .iter()
            .map(|(i, _)| *i)
            .collect()
    }

    /// Connections broken so far.
    pub fn broken(&self) -> usize {
        self.broken.lock().unwrap().len()
    }

    /// Round trips of each connection so far.
    pub fn progress(&self) -> Vec<u64> {
        self.rounds
            .iter()
            .map(|r| r.load(Ordering::SeqCst))
            .collect()
    }

    pub fn finish(self) -> Vec<Ended> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

fn converse(
    client: Ipv4Addr,
    service: SocketAddr,
    stops: [&AtomicBool; 2],
    rounds: &AtomicU64,
    port: &AtomicU32,
    connected: &AtomicU64,
    limit: Duration,
) -> Ended {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(client.into(), 0).into())
        .unwrap();
    let result = socket.connect_timeout(&service.into(), Duration::from_secs(5));
    if let Err(e) = result {
        connected.fetch_add(1, Ordering::SeqCst);
        return Ended::NoConnect(e.to_string());
    }
    let local = socket.local_addr().unwrap().as_socket().unwrap();
    port.store(local.port() as u32, Ordering::SeqCst);
    connected.fetch_add(1, Ordering::SeqCst);
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let start = Instant::now();
    let mut round = 0u64;
    while !stops.iter().any(|s| s.load(Ordering::SeqCst)) && start.elapsed() < limit {
        let line = format!("{round:015}\n");
        if let Err(e) = stream.write_all(line.as_bytes()) {
            return Ended::Broken(format!("write: {e}"));
        }
        let mut echo = [0u8; 16];
        if let Err(e) = stream.read_exact(&mut echo) {
            return Ended::Broken(format!("read: {e}"));
        }
        if echo != line.as_bytes() {
            return Ended::Broken("a wrong echo".into());
        }
        round += 1;
        rounds.store(round, Ordering::SeqCst);
        thread::sleep(ROUND_EVERY);
    }
    Ended::Alive
}
