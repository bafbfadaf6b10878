//! `parsrv run`: the spawner. It runs one or more groups ([`group::RunningGroup`]); each owns
//! its sockets, its instance of the program and its pins, and one supervised handler per
//! socket ([`members`], [`crate::supervisor`]). The spawner never touches a connection.
//!
//! This module starts and stops groups and waits for signals. The rest has a file each:
//! answering control requests ([`answer`]), SIGHUP ([`reload`]), the autoscaler's loop
//! ([`autoscaling`]) and the watchdog, which keeps each group as it was made and warns about
//! handlers that do not use their socket ([`watchdog`]).
//!
//! While running, a group can change size (`parsrv group resize`, or its autoscaler): a new
//! slot gets a new socket, registered before its handler starts; the highest slot is removed
//! by shutting its socket down (the kernel runs the program for every queued connection and
//! pending handshake, which moves them to sockets with room), then retiring its handler.
//! `parsrv group restart` or SIGUSR2 replaces every handler, one at a time. Groups come and
//! go: `parsrv group add` (through the spawner's own control socket), `parsrv group
//! remove`, and SIGHUP.
//!
//! Stop (SIGINT/SIGTERM), group by group: with `drain`, refuse new connections and let the
//! queues empty first (bounded by `grace`); then stop handlers (SIGTERM, grace period,
//! SIGKILL), remove the control socket, detach, unpin.

mod adopt;
mod answer;
mod autoscaling;
mod group;
mod group_status;
mod members;
mod record;
mod reload;
mod stalls;
mod watchdog;

use std::{cell::RefCell, collections::BTreeMap, net::SocketAddr, path::PathBuf, rc::Rc};

use parsrv_common::reuseport::KernelOffsets;

use self::group::RunningGroup;
use crate::{
    control::{self, ControlError, ControlSocket},
    dataplane::{self, netns::NetnsLock},
    error::{Error, Result},
    features::KernelFeatures,
    kernel, metrics, service_manager,
    spec::GroupSpec,
    status::GroupStatus,
};

/// Everything `parsrv run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The groups to run (validated, names and addresses distinct).
    pub groups: Vec<GroupSpec>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// The config file the groups came from: SIGHUP reads it again.
    pub config: Option<PathBuf>,
}

/// Runs the groups until SIGINT or SIGTERM.
pub fn run(options: RunOptions) -> Result<()> {
    executed();
    for spec in &options.groups {
        spec.validate()?;
    }
    // Checks that touch nothing come first, so a refusal leaves nothing behind.
    kernel::check_capabilities()?;
    kernel::check_capabilities_for(&options.groups)?;
    crate::run_dir::check_run_dir()?;
    kernel::raise_fd_limit();
    let programs = dataplane::programs_for_groups(&options.groups);
    let btf = kernel::vmlinux_btf()?;
    KernelFeatures::probe_with(Some(&btf)).require_for(&programs)?;
    let offsets = kernel::offsets_in(&btf)?;
    dataplane::audit::remember_offsets(&btf);
    drop(btf); // some megabytes, not needed while serving
    dataplane::check_objects(&programs)?;
    dataplane::verification::check_and_keep(&dataplane::verification_loads(&options.groups))?;
    for spec in &options.groups {
        ensure_not_running(&spec.name)?;
    }
    kernel::ensure_bpffs(std::path::Path::new(kernel::BPFFS))?;
    // Bound now, so that a port in use fails before any group starts.
    let metrics = options
        .metrics
        .map(|addr| {
            std::net::TcpListener::bind(addr).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    Error::MetricsInUse { addr }
                } else {
                    Error::io(format!("binding the metrics address {addr}"))(e)
                }
            })
        })
        .transpose()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the spawner's runtime"))?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let spawner = Rc::new(Spawner {
            offsets,
            config: options.config,
            groups: RefCell::default(),
            upgrading: tokio::sync::Notify::new(),
        });
        // An upgrade's new image: the groups it adopts keep the settings they run with
        // (the same arguments can mean other settings when a default changed).
        let upgraded = std::env::var_os(UPGRADE_ENV).is_some();
        std::env::remove_var(UPGRADE_ENV);
        for spec in options.groups {
            if let Err(e) = spawner.start_group_adopting(spec, upgraded) {
                dataplane::loader::forget_verified();
                spawner.stop_all().await;
                return Err(e);
            }
        }
        // What the check loaded for a group that adopted its pins instead.
        dataplane::loader::forget_verified();
        service_manager::ready(spawner.groups.borrow().len());
        spawner.serve(metrics).await
    })
}

/// Where group `name`'s record is kept while it runs (see [`record`]).
pub fn record_path(name: &str) -> PathBuf {
    record::GroupRecord::path(name)
}

/// `parsrv stop GROUP` when no spawner answers for it: takes over what its last spawner
/// left running and stops it as that spawner would have (handlers, program, pins, record).
pub fn stop_orphan(name: &str) -> Result<String> {
    crate::run_dir::check_run_dir()?;
    let Some(record) = record::GroupRecord::read(name) else {
        return Err(Error::GroupNotRunning {
            which: format!(" named '{name}'"),
            known: "none answers and no spawner left one running".into(),
        });
    };
    kernel::check_capabilities()?;
    let btf = kernel::vmlinux_btf()?;
    let offsets = kernel::offsets_in(&btf)?;
    dataplane::audit::remember_offsets(&btf);
    drop(btf);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting a runtime"))?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let claim = NetnsLock::acquire()?;
        ensure_not_running(name)?;
        let spec = record.spec.clone();
        let Some(adoption) = adopt::Adoption::take(record) else {
            record::GroupRecord::remove(name);
            dataplane::pins::Pins::remove_stale(&dataplane::pins::group_dir(name))?;
            return Ok(format!(
                "group {name}: none of its handlers ran any more; removed what its last spawner left"
            ));
        };
        let pids = adoption.pids();
        if unpinned_udp(&adoption) {
            kill_adopted(&adoption);
            record::GroupRecord::remove(name);
            drop(claim);
            return Ok(format!(
                "group {name} (UDP, run by an older parsrv): killed the handlers its last spawner left running (pids {pids:?})"
            ));
        }
        let group = RunningGroup::create(spec, offsets, Some(adoption))?;
        drop(claim);
        group.start_handlers()?;
        group.stop().await;
        Ok(format!(
            "group {name}: its handlers {pids:?} (left by a spawner that is gone) stopped, program detached, pins removed"
        ))
    })
}

/// Refuses a group whose addresses and ports overlap a group another spawner runs: the
/// kernel would split connections between two groups' sockets, or two sk_lookup programs
/// would claim the same connections. (Exact addresses are also refused by the bind check;
/// prefixes and port ranges only here.)
fn ensure_no_overlap_with_running(spec: &GroupSpec) -> Result<()> {
    for name in control::running_groups() {
        if name == spec.name {
            continue;
        }
        let Some(record) = record::GroupRecord::read(&name) else {
            continue;
        };
        if let Some((ours, theirs)) = spec.overlap_with(&record.spec) {
            return Err(Error::Rejected(format!(
                "group '{}' ({ours}) overlaps group '{name}' ({theirs}), which spawner {} runs: \
                 a connection would match both; give the new group other addresses or ports",
                spec.name, record.spawner_pid
            )));
        }
    }
    Ok(())
}

fn ensure_not_running(name: &str) -> Result<()> {
    let control_path = control::socket_path(name);
    if let Some(spawner) = control::answering_pid(&control_path) {
        return Err(Error::GroupRunning {
            name: name.to_owned(),
            socket: control_path,
            spawner,
        });
    }
    Ok(())
}

/// Set by an upgrade in the environment of the binary it executes ([`Spawner::reexecute`]),
/// and removed by that binary at its start: the groups it adopts keep their settings.
pub const UPGRADE_ENV: &str = "PARSRV_UPGRADE";

/// Whether `adoption` is of a UDP group whose program an older parsrv left unpinned (it
/// did not adopt UDP groups): nothing can take its program over.
fn unpinned_udp(adoption: &adopt::Adoption) -> bool {
    let spec = &adoption.record.spec;
    spec.is_udp()
        && !dataplane::pins::group_dir(&spec.name)
            .join(dataplane::Program::for_udp(spec.udp_mode).name())
            .exists()
}

/// Kills the handlers of a UDP group a dead spawner left running (SIGKILL, waited for).
fn kill_adopted(adoption: &adopt::Adoption) {
    for slot in adoption.slots.iter().flatten() {
        slot.handler
            .process
            .kill_and_wait(std::time::Duration::from_secs(2));
    }
}

/// The handlers of `spec`'s group that a spawner now gone left running, taken over; `None`
/// if there are none (its record, if any, is stale: the group starts anew). Refused if the
/// running group is not what `spec` asks for: nothing is changed then. After an upgrade
/// (`upgraded`) the arguments are the old ones, so a difference can only be a default this
/// version changed (or a setting it added): the group keeps what it runs with, said in the
/// log, and `spec` becomes the running group's.
fn adopt_if_running(spec: &mut GroupSpec, upgraded: bool) -> Result<Option<adopt::Adoption>> {
    let Some(record) = record::GroupRecord::read(&spec.name) else {
        return Ok(None);
    };
    if upgraded {
        let differences = record.differences(spec);
        if !differences.is_empty() {
            log::warn!(
                "upgrade: group {} keeps the settings it runs with, where this version's defaults differ: {}; `parsrv stop` and run it again to take them",
                spec.name,
                differences.join(", ")
            );
            *spec = record.spec.clone();
        }
    }
    // Compared before anything acts on it: a group running with other settings is left
    // exactly as it is.
    let differences = record.differences(spec);
    if !differences.is_empty() {
        let pids = record.live_handlers();
        if !pids.is_empty() {
            return Err(Error::GroupDiffers {
                name: spec.name.clone(),
                pids,
                differences: differences.join(", "),
            });
        }
    }
    let Some(adoption) = adopt::Adoption::take(record) else {
        log::info!(
            "group {}: no handler of the last run is left; starting anew",
            spec.name
        );
        record::GroupRecord::remove(&spec.name);
        return Ok(None);
    };
    if unpinned_udp(&adoption) {
        // An older parsrv's UDP group: its handlers are killed (they hold sockets in the
        // port's reuseport group, which the new sockets would join unregistered) and the
        // group starts anew. What their buffers held is lost, as in a UDP server's restart.
        kill_adopted(&adoption);
        log::warn!(
            "group {} (UDP): killed the handlers an older parsrv's spawner left running \
             (pids {:?}): it did not pin the group's program, so nothing can take it over; \
             it starts anew",
            spec.name,
            adoption.pids()
        );
        record::GroupRecord::remove(&spec.name);
        return Ok(None);
    }
    let differences = adoption.record.differences(spec);
    if !differences.is_empty() {
        return Err(Error::GroupDiffers {
            name: spec.name.clone(),
            pids: adoption.pids(),
            differences: differences.join(", "),
        });
    }
    log::info!(
        "group {}: adopting its running handlers (pids {:?}) from spawner {}",
        spec.name,
        adoption.pids(),
        adoption.record.spawner_pid
    );
    Ok(Some(adoption))
}

pub(crate) struct Spawner {
    offsets: KernelOffsets,
    config: Option<PathBuf>,
    groups: RefCell<BTreeMap<String, Rc<RunningGroup>>>,
    /// Told by `parsrv upgrade`: the serve loop re-executes the binary.
    upgrading: tokio::sync::Notify,
}

/// This spawner as it was executed, for `parsrv upgrade` and `status`: the binary's path
/// and arguments (read at start: the file may be replaced later, which is the point),
/// and when this image started.
pub struct Executed {
    pub binary: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
}

static EXECUTED: std::sync::OnceLock<Executed> = std::sync::OnceLock::new();

/// How this spawner was executed (set when `run` starts).
pub fn executed() -> &'static Executed {
    EXECUTED.get_or_init(|| Executed {
        binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        args: std::env::args_os().skip(1).collect(),
        started_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    })
}

impl Spawner {
    fn group(&self, name: &str) -> Option<Rc<RunningGroup>> {
        self.groups.borrow().get(name).cloned()
    }

    /// Starts a group. On error, whatever it had created is gone again.
    fn start_group(self: &Rc<Self>, spec: GroupSpec) -> Result<Rc<RunningGroup>> {
        self.start_group_adopting(spec, false)
    }

    /// [`Spawner::start_group`]; `upgraded`: this process is an upgrade's new image, and a
    /// group it adopts keeps the settings it runs with ([`adopt_if_running`]).
    fn start_group_adopting(
        self: &Rc<Self>,
        mut spec: GroupSpec,
        upgraded: bool,
    ) -> Result<Rc<RunningGroup>> {
        spec.validate()?;
        if spec.needs_lookup() {
            // `parsrv run` checked the kernel for its own groups; one added later may need
            // the sk_lookup program, which they did not.
            KernelFeatures::probe()
                .require_for(&dataplane::programs_for_groups(std::slice::from_ref(&spec)))?;
        }
        // Another spawner of this namespace may be starting a group right now: from the
        // check that the name is free to the bound control socket, and from the check that
        // the address is free to the bound sockets, one spawner at a time.
        let claim = NetnsLock::acquire()?;
        ensure_not_running(&spec.name)?;
        if let Some(other) = self
            .groups
            .borrow()
            .values()
            .find(|g| g.spec.overlap_with(&spec).is_some() || g.spec.name == spec.name)
        {
            return Err(Error::Rejected(format!(
                "group '{}' ({}) is already served here as '{}' ({}): give the new group its own name and address",
                spec.name,
                spec.listen_text(),
                other.spec.name,
                other.spec.listen_text()
            )));
        }
        ensure_no_overlap_with_running(&spec)?;
        let adoption = adopt_if_running(&mut spec, upgraded)?;
        let group = RunningGroup::create(spec, self.offsets, adoption)?;
        let control = ControlSocket::bind(&group.spec.name)?;
        // The record too, before the claim goes: a spawner that claims the namespace next
        // then finds this group by its record and refuses an overlapping group naming it,
        // every time, rather than meeting its bound sockets (a bare "address in use") when
        // it comes before the record.
        group.save_record()?;
        drop(claim);
        group.start_handlers()?;
        let answering = {
            let (spawner, name) = (self.clone(), group.spec.name.clone());
            tokio::task::spawn_local(async move {
                control
                    .serve(move |request| {
                        let (spawner, name) = (spawner.clone(), name.clone());
                        async move { spawner.answer(&name, request).await }
                    })
                    .await;
            })
        };
        group.own_task(answering);
        // Both read TCP's accept queues and walk TCP sockets: a UDP group has neither yet
        // (docs/udp.md).
        if !group.spec.is_udp() {
            group.own_task(tokio::task::spawn_local(watchdog::watch(group.clone())));
            group.own_task(tokio::task::spawn_local(stalls::watch(group.clone())));
        }
        if let Some(log) = group.take_program_log() {
            group.own_task(tokio::task::spawn_local(group::forward_program_log(log)));
        }
        if group.spec.autoscaled() {
            group.own_task(tokio::task::spawn_local(autoscaling::run(group.clone())));
        }
        let spec = &group.spec;
        let steering = if spec.is_udp() {
            "datagrams to a socket with receive-buffer room".to_owned()
        } else {
            format!("policy {}, when-full {}", spec.policy, spec.when_full)
        };
        log::info!(
            "group {} serves {} with {} {} handlers{} ({steering}); status: parsrv status {}",
            spec.name,
            spec.listen_text(),
            spec.handlers.min,
            spec.handler,
            match (spec.autoscaled(), spec.handlers.max > spec.handlers.min) {
                (true, _) => format!(" (autoscaled {})", spec.handlers),
                (false, true) => format!(" (resizable {})", spec.handlers),
                _ => String::new(),
            },
            spec.name
        );
        self.groups
            .borrow_mut()
            .insert(group.spec.name.clone(), group.clone());
        Ok(group)
    }

    /// Stops and forgets one group. It answers `status` while it drains and stops.
    async fn remove_group(&self, name: &str) -> bool {
        let Some(group) = self.group(name) else {
            return false;
        };
        group.stop().await;
        self.groups.borrow_mut().remove(name);
        true
    }

    async fn stop_all(&self) {
        let names: Vec<String> = self.groups.borrow().keys().cloned().collect();
        for name in names {
            self.remove_group(&name).await;
        }
    }

    /// `parsrv upgrade`: checks that the binary at this spawner's path can be executed,
    /// then has the serve loop execute it ([`Spawner::reexecute`]).
    fn upgrade(&self) -> Result<String> {
        let binary = &executed().binary;
        let usable = std::fs::metadata(binary).map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        });
        if !usable.unwrap_or(false) {
            return Err(Error::Rejected(format!(
                "cannot upgrade: {} is not an executable file now; install the new parsrv there first",
                binary.display()
            )));
        }
        self.upgrading.notify_one();
        Ok(format!(
            "spawner {} re-executes {}: its groups carry on, adopted by the new binary",
            std::process::id(),
            binary.display()
        ))
    }

    /// Replaces this process's image with the binary at its path, same arguments and
    /// environment. Nothing is stopped: handlers keep serving (they are still this
    /// process's children), the program stays attached, the records under the run directory
    /// are current, and the new image adopts every group as a spawner started after a crash
    /// would. Returns only on failure.
    fn reexecute(&self) -> std::io::Error {
        use std::os::unix::process::CommandExt;
        let executed = executed();
        log::info!(
            "upgrade: executing {} {:?}",
            executed.binary.display(),
            executed.args
        );
        std::process::Command::new(&executed.binary)
            .args(&executed.args)
            .env(UPGRADE_ENV, "1")
            .exec()
    }

    fn statuses(&self) -> Vec<GroupStatus> {
        let groups: Vec<_> = self.groups.borrow().values().cloned().collect();
        groups.iter().filter_map(|g| g.status().ok()).collect()
    }

    async fn serve(self: Rc<Self>, metrics: Option<std::net::TcpListener>) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let installing = |kind: &str| Error::io(format!("installing a {kind} handler"));
        let mut interrupt = signal(SignalKind::interrupt()).map_err(installing("SIGINT"))?;
        let mut terminate = signal(SignalKind::terminate()).map_err(installing("SIGTERM"))?;
        let mut restart = signal(SignalKind::user_defined2()).map_err(installing("SIGUSR2"))?;
        let mut reload = signal(SignalKind::hangup()).map_err(installing("SIGHUP"))?;
        let own = ControlSocket::bind_spawner()?;
        let answering = {
            let spawner = self.clone();
            tokio::task::spawn_local(async move {
                own.serve(move |request| {
                    let spawner = spawner.clone();
                    async move { spawner.answer_spawner(request).await }
                })
                .await;
            })
        };
        let watchdog = tokio::task::spawn_local(service_manager::watchdog());
        let exporting = match metrics {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std({
                    listener
                        .set_nonblocking(true)
                        .map_err(Error::io("the metrics socket"))?;
                    listener
                })
                .map_err(Error::io("the metrics socket"))?;
                log::info!(
                    "metrics: http://{}/metrics",
                    listener
                        .local_addr()
                        .map_err(Error::io("the metrics socket"))?
                );
                let spawner = self.clone();
                Some(tokio::task::spawn_local(metrics::serve(
                    listener,
                    move || spawner.statuses(),
                )))
            }
            None => None,
        };
        loop {
            tokio::select! {
                _ = interrupt.recv() => { log::info!("SIGINT: stopping"); break; }
                _ = terminate.recv() => { log::info!("SIGTERM: stopping"); break; }
                _ = restart.recv() => {
                    log::info!("SIGUSR2: restarting every handler of every group");
                    let groups: Vec<_> = self.groups.borrow().values().cloned().collect();
                    tokio::task::spawn_local(async move {
                        for group in groups {
                            if let Err(ControlError::Failed(e)) = group.restart_all().await {
                                log::error!("{e}");
                            }
                        }
                    });
                }
                _ = reload.recv() => {
                    service_manager::reloading();
                    self.reload().await;
                    service_manager::ready(self.groups.borrow().len());
                }
                _ = self.upgrading.notified() => {
                    // Let the answer to `parsrv upgrade` reach its client first.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    // The new image says READY=1 once it has adopted every group.
                    service_manager::reloading();
                    let error = self.reexecute();
                    log::error!("upgrade: {error}; this spawner carries on");
                    service_manager::ready(self.groups.borrow().len());
                }
            }
        }
        service_manager::stopping();
        watchdog.abort();
        answering.abort();
        // The monitoring endpoint answers while groups drain and stop: /healthz says 503.
        self.stop_all().await;
        if let Some(exporting) = exporting {
            exporting.abort();
        }
        Ok(())
    }
}
