//! Several hosts behind ECMP: each host runs a dispatcher (a tc
//! program, [`crate::dataplane::cluster`]) with a local copy of the cluster's dispatch table,
//! and an agent ([`agent`]) that keeps the copies in step over TCP with the configured peers
//! ([`protocol`], [`table`]). The routers spread the service address over the hosts (Linux
//! ECMP, fed by a routing daemon that the agent's `ready` and `draining` commands drive);
//! when their choice changes, the packets of a connection that reach another host are sent
//! on to the host that has it, so no connection breaks.
//!
//! `parsrv cluster run --config FILE` runs the agent for the file's `[cluster]` section
//! ([`spec`]); the groups of the same file run under `parsrv run` as before. The two are
//! separate processes on purpose: either may die and be started again while the other and
//! the dispatcher (pinned) keep serving.

pub mod agent;
pub mod certs;
pub mod expiry;
pub mod membership;
pub mod metrics;
pub mod protocol;
pub mod spec;
pub mod table;
pub mod tls;

use std::net::Ipv4Addr;

use parsrv_common::cluster::ClusterConfig;

pub use crate::status::cluster::ClusterStatus;
pub use spec::ClusterSpec;

use crate::{
    control::{self, Request, Response},
    dataplane::cluster::{pin_dir, remove_dir, Dispatcher},
    error::{Error, Result},
    kernel,
};

/// This host as the dispatcher needs it: the interface's index and MAC. Checks what the
/// config file alone cannot: the interface exists, and the service address is on this host.
pub fn check_host(spec: &ClusterSpec) -> Result<(u32, [u8; 6])> {
    let ifindex = nix::net::if_::if_nametoindex(spec.interface.as_str()).map_err(|_| {
        Error::Rejected(format!(
            "interface '{}' does not exist in this network namespace: give the interface \
             towards the routers (`ip link` lists them)",
            spec.interface
        ))
    })?;
    let mac = nix::ifaddrs::getifaddrs()
        .ok()
        .and_then(|mut addrs| {
            addrs.find_map(|a| {
                (a.interface_name == spec.interface)
                    .then(|| a.address?.as_link_addr()?.addr())
                    .flatten()
            })
        })
        .filter(|mac| mac.iter().any(|b| *b != 0))
        .ok_or_else(|| {
            Error::Rejected(format!(
                "interface '{}' has no MAC address: the dispatcher forwards on an Ethernet \
                 segment (a veth, a bridge port, a NIC), not on '{}'",
                spec.interface, spec.interface
            ))
        })?;
    let probe = std::net::TcpListener::bind((spec.service_ip(), 0));
    if let Err(e) = probe {
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            return Err(Error::Rejected(format!(
                "service address {} is not on this host: add it to the loopback device \
                 (`ip addr add {}/32 dev lo`), as every host of the cluster has it",
                spec.service_ip(),
                spec.service_ip()
            )));
        }
    }
    Ok((ifindex, mac))
}

/// Runs the agent of `spec` until SIGINT or SIGTERM; then the host withdraws and the
/// dispatcher is detached (its pins removed). A SIGKILLed agent leaves the dispatcher
/// running on its last table, and the next agent takes it over.
pub fn run(spec: ClusterSpec) -> Result<()> {
    let problems = spec.problems();
    if let Some(first) = problems.first() {
        return Err(Error::Rejected(format!("[cluster] {first}")));
    }
    let tls = spec
        .tls
        .as_ref()
        .map(|files| tls::PeerTls::load(files, &spec.name, spec.host))
        .transpose()?;
    if tls.is_none() {
        log::warn!("plaintext = true: peers are recognised by their address alone");
    }
    kernel::check_capabilities()?;
    crate::run_dir::check_run_dir()?;
    kernel::raise_fd_limit();
    crate::features::KernelFeatures::probe()
        .require_for(&[crate::dataplane::Program::ClusterDispatch])?;
    crate::dataplane::verification::check(&[crate::dataplane::Program::ClusterDispatch])?;
    let (ifindex, mac) = check_host(&spec)?;
    kernel::ensure_bpffs(std::path::Path::new(kernel::BPFFS))?;
    let config = ClusterConfig {
        service_addr: spec.service_ip().octets(),
        service_port: spec.service.port().to_be_bytes(),
        this_host: spec.host,
        ifindex,
        mac,
        max_host: spec
            .peers
            .iter()
            .map(|p| p.host)
            .chain([spec.host])
            .max()
            .expect("this host at least"),
    };
    let dir = pin_dir(&spec.name, spec.host);
    let adopted = match Dispatcher::adopt(&dir) {
        Ok((dispatcher, ring)) if dispatcher.config().ok() == Some(config) => {
            log::info!(
                "took over the dispatcher at {} with {} clients",
                dir.display(),
                dispatcher.clients().len()
            );
            Some((dispatcher, ring))
        }
        Ok(_) => {
            log::warn!(
                "the dispatcher at {} has another config: replacing it",
                dir.display()
            );
            remove_dir(&dir)?;
            None
        }
        Err(_) => {
            remove_dir(&dir)?;
            None
        }
    };
    let (dispatcher, ring) = match adopted {
        Some(found) => found,
        None => Dispatcher::load(config, spec.table_size, &spec.interface, &dir)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the runtime"))?;
    let local = tokio::task::LocalSet::new();
    let agent = agent::Agent::new(spec, tls, mac, dispatcher);
    let result = local.block_on(&runtime, agent.run(ring, stop_signal()));
    // Detach: the host has left the cluster.
    remove_dir(&dir)?;
    result
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Asks the agent of cluster `name` on this host, over the control protocol every parsrv
/// socket speaks (`control::Request`).
fn ask(name: &str, request: &Request) -> Result<Response> {
    let path = agent::control_path(name);
    let whom = format!("the agent of cluster '{name}'");
    let answer = control::request_at(&path, &whom, request).map_err(|e| {
        Error::Rejected(format!(
            "no agent of cluster '{name}' answers ({e}): start it with `parsrv cluster run --config FILE`"
        ))
    })?;
    match answer {
        Response::Failed(e) => Err(Error::Spawner {
            group: whom,
            message: e.to_string(),
        }),
        answer => Ok(answer),
    }
}

pub fn status(name: &str) -> Result<ClusterStatus> {
    match ask(name, &Request::Status)? {
        Response::ClusterStatus(status) => Ok(*status),
        _ => Err(Error::Spawner {
            group: format!("the agent of cluster '{name}'"),
            message: "answered with something other than its status".into(),
        }),
    }
}

pub fn drain(name: &str) -> Result<()> {
    ask(name, &Request::Drain).map(drop)
}

/// A client's address as the table keys it.
pub fn client_key(client: Ipv4Addr) -> [u8; 4] {
    client.octets()
}
