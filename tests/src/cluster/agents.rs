//! The hosts' parsrv processes: groups and agents started, stopped and killed, and whole
//! hosts killed.

use super::*;

impl Topology {
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
        let answered = wait_polling(START_WITHIN, || {
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
            wait_polling(Duration::from_secs(20), ready),
            "the agents did not all get ready: {:?}",
            ids.iter()
                .map(|&id| self.cluster_status(id))
                .collect::<Vec<_>>()
        );
    }

    /// Host `id`'s agent's status as `parsrv cluster status --json` prints it, asked over
    /// its control socket as that command does, without running it: the tests ask often,
    /// and under emulation a run of parsrv costs about a third of a second of the VM's CPU.
    /// None if no agent answers.
    pub fn cluster_status(&self, id: u16) -> Option<serde_json::Value> {
        use parsrv::control::{request_at, Response};
        let socket = parsrv::cluster::agent::control_path_in(&self.host(id).run_dir, CLUSTER);
        match request_at(&socket, "the agent", &parsrv::control::Request::Status) {
            Ok(Response::ClusterStatus(status)) => {
                Some(serde_json::to_value(*status).expect("serializable"))
            }
            _ => None,
        }
    }

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
}
