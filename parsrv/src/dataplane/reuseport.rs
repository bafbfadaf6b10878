//! The SK_REUSEPORT program's userspace (eBPF side: `parsrv-ebpf/src/reuseport.rs`, shared
//! types: `parsrv_common::reuseport`): loading it, registering the group's sockets in its
//! maps, attaching it to the group, pinning the maps, and reading its counters.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf, SockMap},
    programs::{sk_reuseport::SkReuseportError, ProgramError, SkReuseport},
    Ebpf,
};
use parsrv_common::reuseport::{
    flags, names, GlobalCounters, ProgramConfig, SlotCounters, MAX_SOCKETS,
};

use super::{
    affinity::DispatchTable,
    loader::{self, MapSizes},
    lookup::{self, AddressLookup},
    object,
    pins::Pins,
    sum_over_cpus, verification, EbpfObject, Program,
};
use crate::{
    error::{Error, Result},
    listeners::Listener,
    spec::Listen,
};

/// The loaded program and its maps. Dropping it unloads the program unless a group still
/// holds it (detach explicitly with [`Steering::detach`]).
pub struct Steering {
    loaded: Loaded,
    sockets: SockMap<MapData>,
    slot_by_cookie: HashMap<MapData, u64, u32>,
    slot_counters: PerCpuArray<MapData, SlotCounters>,
    global_counters: PerCpuArray<MapData, GlobalCounters>,
    config: Array<MapData, ProgramConfig>,
    dispatch_table: DispatchTable,
    /// The sk_lookup program's maps, for a group on several addresses, a prefix or a port
    /// range (the program is in the group's pins, attached to the network namespace).
    addresses: Option<AddressLookup>,
    /// The program's queue alerts, until the autoscaler takes them ([`Steering::take_alerts`]).
    /// None from the pins of a group whose program sends none (an older parsrv's).
    alerts: Option<RingBuf<MapData>>,
    /// What CONFIG holds.
    current: ProgramConfig,
    /// Maps pinned in a staging directory, and where they go once published.
    staged: Option<(Pins, PathBuf)>,
}

/// Where the program came from: loaded from the embedded object by this spawner, or
/// taken from the pins of a group this spawner adopted.
pub(super) enum Loaded {
    Object(Ebpf),
    Adopted(Box<SkReuseport>),
}

/// The program's own cost, from the kernel (needs kernel.bpf_stats_enabled=1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunStats {
    pub program_id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Whether kernel.bpf_stats_enabled is on (otherwise the two figures stay 0).
    pub stats_enabled: bool,
    /// Instructions the verifier processed to load it (Linux 5.16+; absent from an older
    /// spawner's status).
    #[serde(default)]
    pub verified_insns: Option<u32>,
}

impl Steering {
    /// Loads the program with expected attach type SELECT_OR_MIGRATE and writes `config`,
    /// with a dispatch table of `table_size` entries. With `lookup` (a group on several
    /// addresses, a prefix or a port range), the sk_lookup program is loaded too, from its
    /// own object on this program's SOCKETS and CONFIG, its rules written, and attached to
    /// this process's network namespace (its link pinned with the maps).
    ///
    /// With `pin_dir`, the program and maps are pinned at once into a staging directory
    /// beside it, which [`Steering::publish_pins`] renames to `pin_dir` in one step (so a
    /// reader never sees half a set) and which is removed if anything fails before. The
    /// lookup program needs them: it takes this program's maps from their pins. Without
    /// (tests of the program alone), nothing is pinned.
    pub fn load(
        config: ProgramConfig,
        table_size: u32,
        pin_dir: Option<&Path>,
        lookup: Option<&[Listen]>,
    ) -> Result<Self> {
        let object = object(EbpfObject::Parsrv)?;
        let mut ebpf =
            loader::load(&object, MapSizes::for_connections(table_size)).map_err(|e| match &e {
                // The only map sized at run time: too big for this machine's memory.
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    Error::Rejected(format!(
                        "--affinity-table {table_size}: the kernel could not allocate a \
                         dispatch table that large (ENOMEM); give fewer entries"
                    ))
                }
                _ => Error::ebpf("loading the parsrv eBPF object")(e),
            })?;
        let program: &mut SkReuseport = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| missing(names::PROGRAM))?
            .try_into()
            .map_err(Error::ebpf("the parsrv program has the wrong type"))?;
        loader::load_program(program)
            .map_err(|e| verification::refusal(Program::ReuseportSelect, e))?;

        let staged = pin_dir.map(Pins::staging).transpose()?;
        // The program too: a spawner that adopts the group re-attaches it and reads its
        // info and log.
        if let Some(staged) = &staged {
            program
                .pin(staged.0.join(names::PROGRAM))
                .map_err(Error::ebpf("pinning the program"))?;
        }
        let mut take = |name: &str| -> Result<Map> {
            let map = ebpf.take_map(name).ok_or_else(|| missing(name))?;
            if let Some(staged) = &staged {
                map.pin(staged.0.join(name))
                    .map_err(Error::ebpf(format!("pinning map {name}")))?;
            }
            Ok(map)
        };
        let sockets = take(names::SOCKETS)?;
        let slot_by_cookie = take(names::SLOT_BY_COOKIE)?;
        let slot_counters = take(names::SLOT_COUNTERS)?;
        let global_counters = take(names::GLOBAL_COUNTERS)?;
        let config_map = take(names::CONFIG)?;
        let dispatch_table = take(names::DISPATCH_TABLE)?;
        let affinity_counters = take(names::AFFINITY_COUNTERS)?;
        let alerts = take(names::QUEUE_ALERTS)?;
        let typed = |name: &str| Error::ebpf(format!("map {name} has the wrong type"));
        let mut steering = Steering {
            sockets: sockets.try_into().map_err(typed(names::SOCKETS))?,
            slot_by_cookie: slot_by_cookie
                .try_into()
                .map_err(typed(names::SLOT_BY_COOKIE))?,
            slot_counters: slot_counters
                .try_into()
                .map_err(typed(names::SLOT_COUNTERS))?,
            global_counters: global_counters
                .try_into()
                .map_err(typed(names::GLOBAL_COUNTERS))?,
            config: config_map.try_into().map_err(typed(names::CONFIG))?,
            dispatch_table: DispatchTable {
                entries: dispatch_table
                    .try_into()
                    .map_err(typed(names::DISPATCH_TABLE))?,
                counters: affinity_counters
                    .try_into()
                    .map_err(typed(names::AFFINITY_COUNTERS))?,
                capacity: table_size,
            },
            alerts: Some(alerts.try_into().map_err(typed(names::QUEUE_ALERTS))?),
            addresses: None,
            staged: staged.zip(pin_dir.map(Path::to_owned)),
            current: ProgramConfig {
                generation: 1,
                ..config
            },
            loaded: Loaded::Object(ebpf),
        };
        // Before the lookup program runs: it reads CONFIG.
        steering.write_config()?;
        if let Some(listen) = lookup {
            let Some((staged, _)) = &steering.staged else {
                return Err(Error::ebpf("loading the sk_lookup program")(
                    anyhow::anyhow!(
                        "it takes the group's maps from their pins, and the group has none"
                    ),
                ));
            };
            steering.addresses = Some(lookup::load(staged.dir(), listen)?);
        }
        Ok(steering)
    }

    /// Takes over the program and maps a running group pinned at `pin_dir` (its spawner is
    /// gone), and writes `config`, keeping the group's generation going. With `lookup`, the
    /// group is on several addresses and its sk_lookup program's maps are taken too (an
    /// older parsrv pinned them for every group; they are left alone where not needed).
    pub fn adopt(config: ProgramConfig, pin_dir: &Path, lookup: bool) -> Result<Self> {
        let config_map: Array<MapData, ProgramConfig> = pinned(pin_dir, names::CONFIG)?;
        let running = config_map
            .get(&0, 0)
            .map_err(Error::ebpf("reading the program's CONFIG"))?;
        let program = SkReuseport::from_pin(
            pin_dir.join(names::PROGRAM),
            aya::programs::SkReuseportAttachType::SelectOrMigrate,
        )
        .map_err(Error::ebpf("opening the pinned program"))?;
        let mut steering = Steering {
            loaded: Loaded::Adopted(Box::new(program)),
            sockets: pinned(pin_dir, names::SOCKETS)?,
            slot_by_cookie: pinned(pin_dir, names::SLOT_BY_COOKIE)?,
            slot_counters: pinned(pin_dir, names::SLOT_COUNTERS)?,
            global_counters: pinned(pin_dir, names::GLOBAL_COUNTERS)?,
            config: config_map,
            dispatch_table: adopt_dispatch_table(pin_dir)?,
            addresses: lookup.then(|| AddressLookup::adopt(pin_dir)).transpose()?,
            alerts: pinned(pin_dir, names::QUEUE_ALERTS).ok(),
            staged: None,
            // Not draining: a spawner that died draining left the group to whoever adopts it.
            current: ProgramConfig {
                generation: running.generation,
                flags: 0,
                // The slots registered so far: adopted sockets are not registered again.
                slots: running.slots,
                ..config
            },
        };
        steering.new_generation()?;
        Ok(steering)
    }

    /// The program's queue alerts, for the one reader that sleeps on them (the autoscaler).
    pub fn take_alerts(&mut self) -> Option<RingBuf<MapData>> {
        self.alerts.take()
    }

    /// Moves the staged pins to the directory given to [`Steering::load`]. The returned
    /// guard removes them when dropped.
    pub fn publish_pins(&mut self) -> Result<Option<Pins>> {
        let Some((staged, dir)) = self.staged.take() else {
            return Ok(None);
        };
        staged.publish(dir).map(Some)
    }

    /// Replaces the program's offsets and policy; they apply from the next connection on.
    /// (The generation, flags and registered slots stay parsrv's own.)
    pub fn set_config(&mut self, config: ProgramConfig) -> Result<()> {
        self.current = ProgramConfig {
            generation: self.current.generation,
            flags: self.current.flags,
            slots: self.current.slots,
            ..config
        };
        self.write_config()
    }

    fn write_config(&mut self) -> Result<()> {
        self.config
            .set(0, self.current, 0)
            .map_err(Error::ebpf("writing the program's CONFIG"))
    }

    /// Tells the program that the group's membership changed: its cached slot of each
    /// `socks[]` position is stale.
    fn new_generation(&mut self) -> Result<()> {
        self.current.generation = self.current.generation.wrapping_add(1).max(1);
        self.write_config()
    }

    fn program(&self) -> &SkReuseport {
        match &self.loaded {
            Loaded::Object(ebpf) => ebpf
                .program(names::PROGRAM)
                .and_then(|p| p.try_into().ok())
                .expect("loaded in Steering::load"),
            Loaded::Adopted(program) => program,
        }
    }

    /// Names a socket that is about to join the group: the program can then tell it is
    /// `slot` when it meets it among the group's sockets, before [`Steering::register`]
    /// makes it selectable. Called before listen(); see [`crate::listeners::Listeners`].
    pub fn register_cookie(&mut self, slot: u32, cookie: u64) -> Result<()> {
        self.slot_by_cookie
            .insert(cookie, slot, 0)
            .map_err(Error::ebpf(format!(
                "registering the socket of slot {slot}"
            )))
    }

    /// Makes `listener` selectable as `slot`. The socket must already listen.
    pub fn register(&mut self, slot: u32, listener: &Listener) -> Result<()> {
        if slot >= MAX_SOCKETS {
            return Err(Error::ebpf(format!("registering slot {slot}"))(
                anyhow::anyhow!("slots are 0 to {}", MAX_SOCKETS - 1),
            ));
        }
        let context = format!("registering the socket of slot {slot}");
        self.slot_by_cookie
            .insert(listener.cookie(), slot, 0)
            .map_err(Error::ebpf(context.clone()))?;
        self.sockets
            .set(slot, listener.socket(), 0)
            .map_err(Error::ebpf(context))?;
        if let Some(addresses) = &mut self.addresses {
            let v6_only = listener.addr().is_ipv6() && listener.socket().only_v6().unwrap_or(true);
            addresses.set_slot(slot, Some((listener.entry(), v6_only)))?;
        }
        self.current.slots = self.current.slots.max(slot + 1);
        self.new_generation()
    }

    /// Forgets `slot` (whose socket has `cookie`): after its socket left the group.
    pub fn unregister(&mut self, slot: u32, cookie: u64) -> Result<()> {
        self.forget_socket(slot)?;
        // Its cookie may be gone already if registration failed halfway.
        let _ = self.slot_by_cookie.remove(&cookie);
        if let Some(addresses) = &mut self.addresses {
            addresses.set_slot(slot, None)?;
        }
        self.new_generation()
    }

    /// Empties `slot`'s SOCKETS entry, keeping its cookie: its socket left the group for a
    /// while ([`Steering::register`] puts it back).
    pub fn forget_socket(&mut self, slot: u32) -> Result<()> {
        match self.sockets.clear_index(&slot) {
            Ok(()) => {}
            // The kernel empties a socket's slot itself when the socket is shut down or
            // closed; deleting an empty SOCKMAP slot says EINVAL (`__sock_map_delete`).
            Err(aya::maps::MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
            Err(e) => {
                return Err(Error::ebpf(format!(
                    "unregistering the socket of slot {slot}"
                ))(e))
            }
        }
        self.new_generation()
    }

    /// Draining: every new connection is refused (RST) while queued ones are served.
    pub fn set_draining(&mut self, draining: bool) -> Result<()> {
        if draining {
            self.current.flags |= flags::DRAINING;
        } else {
            self.current.flags &= !flags::DRAINING;
        }
        self.write_config()
    }

    /// Attaches the program to the reuseport group `member` belongs to. From then on it
    /// picks the socket for every new connection to the group.
    pub fn attach(&self, member: &impl AsFd) -> Result<()> {
        self.program()
            .attach(member.as_fd())
            .map_err(Error::ebpf("attaching the program to the socket group"))
    }

    /// Detaches whatever program the group of `member` has; the kernel's hash takes over.
    /// Done too when there is nothing to detach: the kernel answers ENOENT once `member` has
    /// left its group (shut down or closed, as every socket is at the end of a stop: the
    /// group and its program went with the last one) or when the group has no program.
    pub fn detach(member: &impl AsFd) -> Result<()> {
        match SkReuseport::detach(member.as_fd()) {
            Err(ProgramError::SkReuseportError(SkReuseportError::SetsockoptError {
                io_error,
                ..
            })) if io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            done => done.map_err(Error::ebpf("detaching the program from the socket group")),
        }
    }

    /// Per-slot counters summed over CPUs, for slots `0..slots`.
    pub fn slot_counters(&self, slots: u32) -> Result<Vec<SlotCounters>> {
        (0..slots)
            .map(|slot| {
                sum_over_cpus(
                    &self.slot_counters,
                    slot,
                    SlotCounters::add,
                    names::SLOT_COUNTERS,
                )
            })
            .collect()
    }

    /// Internal errors (each one a connection served by the kernel's hash), summed over CPUs.
    pub fn global_counters(&self) -> Result<GlobalCounters> {
        sum_over_cpus(
            &self.global_counters,
            0,
            GlobalCounters::add,
            names::GLOBAL_COUNTERS,
        )
    }

    /// The sk_lookup program's maps (per-address counters), for a group on several addresses.
    pub fn addresses(&self) -> Option<&AddressLookup> {
        self.addresses.as_ref()
    }

    /// The dispatch table of client affinity.
    pub fn dispatch_table(&self) -> &DispatchTable {
        &self.dispatch_table
    }

    /// The program's log records, named for `group` (once: the ring buffer has one reader).
    pub fn take_log(&mut self, group: &str) -> Result<ProgramLog> {
        let logger = FailOpenLog {
            group: group.to_owned(),
        };
        let program_id = self.run_stats()?.program_id;
        match &mut self.loaded {
            Loaded::Object(ebpf) => aya_log::EbpfLogger::init_with_logger(ebpf, logger),
            Loaded::Adopted(_) => aya_log::EbpfLogger::init_from_id_with_logger(program_id, logger),
        }
        .map(ProgramLog)
        .map_err(Error::ebpf(format!(
            "reading the program's log ({})",
            names::LOGS
        )))
    }

    pub fn run_stats(&self) -> Result<RunStats> {
        let info = self
            .program()
            .info()
            .map_err(Error::ebpf("reading the program's info"))?;
        Ok(RunStats::of(&info))
    }
}

impl RunStats {
    /// From a program's info as the kernel gives it.
    pub fn of(info: &aya::programs::ProgramInfo) -> RunStats {
        RunStats {
            program_id: info.id(),
            run_count: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
            stats_enabled: crate::procfs::sysctl("kernel/bpf_stats_enabled")
                .is_ok_and(|s| s == "1"),
            verified_insns: info.verified_instruction_count().filter(|&n| n > 0),
        }
    }
}

/// The program's log records (aya-log), for the spawner's log: reports of fail-open errors,
/// which the program sends at most once a second per CPU.
pub struct ProgramLog(aya_log::EbpfLogger<FailOpenLog>);

impl ProgramLog {
    /// Writes what the program reported since the last call to the spawner's log.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl std::os::fd::AsRawFd for ProgramLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Turns the program's `fail-open CODE hash HASH` records into a line that names the group
/// and the error (by its counter's description).
pub struct FailOpenLog {
    group: String,
}

impl log::Log for FailOpenLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let mut words = text.split_whitespace();
        let parsed = match (words.next(), words.next(), words.next(), words.next()) {
            (Some("fail-open"), Some(code), Some("hash"), Some(hash)) => {
                code.parse::<usize>().ok().zip(hash.parse::<u32>().ok())
            }
            _ => None,
        };
        let group = &self.group;
        match parsed.and_then(|(code, hash)| Some((GlobalCounters::COUNTERS.get(code)?, hash))) {
            Some((counter, hash)) => log::warn!(
                "group {group}: the program failed open ({}: {}) for a connection with hash \
                 {hash:#010x}, which the kernel's hash choice serves; reported at most once a \
                 second per CPU, `parsrv status` counts every one",
                counter.column,
                counter.help.trim_end_matches('.')
            ),
            None => log::warn!("group {group}: the program says: {text}"),
        }
    }

    fn flush(&self) {}
}

/// The dispatch table a running group pinned, with the size its spawner gave it.
fn adopt_dispatch_table(pin_dir: &Path) -> Result<DispatchTable> {
    let path = pin_dir.join(names::DISPATCH_TABLE);
    let capacity = MapData::from_pin(&path)
        .and_then(|data| data.info())
        .map_err(Error::ebpf(format!(
            "opening pinned map {}",
            path.display()
        )))?
        .max_entries();
    Ok(DispatchTable {
        entries: pinned(pin_dir, names::DISPATCH_TABLE)?,
        counters: pinned(pin_dir, names::AFFINITY_COUNTERS)?,
        capacity,
    })
}

/// Map `name` pinned in `pin_dir`, as the type the program declares it with.
pub(super) fn pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &str,
) -> Result<T> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(Error::ebpf(format!(
        "opening pinned map {}",
        path.display()
    )))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(Error::ebpf(format!("pinned map {name} (wrong type?)")))
}

fn missing(name: &str) -> Error {
    Error::ebpf("the embedded eBPF object is not parsrv's")(anyhow::anyhow!("it has no {name}"))
}
