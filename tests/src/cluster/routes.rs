//! The router's view of the hosts: a plain or resilient multipath route, or BIRD announcing
//! the ready hosts.

use super::*;

impl Topology {
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
            wait_polling(Duration::from_secs(10), answers),
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
            wait_polling(Duration::from_secs(15), || self.router_next_hops() == want),
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
}
