//! The UDP programs' userspace (eBPF side: `parsrv-ebpf/src/bin/udp_datagram.rs`,
//! `udp_flow.rs` and `udp_quic.rs`, shared types: `parsrv_common::udp`): loading a UDP group's
//! program (by its `--udp-mode`), registering the group's sockets, attaching it, and reading
//! its counters and its table (of flows, or of QUIC first flights). The program and its maps
//! are pinned under the group's directory, as a TCP group's are, so that a spawner that
//! starts after this one is gone (a crash, `parsrv upgrade`) takes them over with the
//! sockets its handlers hold ([`DatagramSteering::adopt`]).

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
};
use parsrv_common::udp::{
    names, FirstFlightKey, FlowEntry, FlowKey, UdpConfig, UdpErrors, UdpOffsets, UdpSlotCounters,
    UdpTableCounters, DEFAULT_FLOW_TABLE, DEFAULT_FLOW_TIMEOUT_SECONDS, DEFAULT_RESERVE,
    MAX_SOCKETS,
};

use super::{
    loader::{self, MapSizes},
    monotonic_ns, object,
    pins::Pins,
    reuseport::{pinned, Loaded, RunStats},
    sum_over_cpus, verification, Program,
};
use crate::{
    error::{Error, Result},
    kernel,
    spec::{GroupSpec, UdpMode},
};

/// What a UDP group's program is loaded with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UdpSettings {
    pub mode: UdpMode,
    /// Bytes a socket's receive buffer must have free to count as having room.
    pub reserve: u32,
    /// Flow and quic modes: how long a flow (a first flight) may be idle before it is
    /// placed again.
    pub flow_timeout: Duration,
    /// Flow and quic modes: how many flows (first flights) the table holds.
    pub flow_table: u32,
}

impl UdpSettings {
    /// The datagram mode, with the defaults.
    pub fn datagram() -> Self {
        UdpSettings {
            mode: UdpMode::Datagram,
            reserve: DEFAULT_RESERVE,
            flow_timeout: Duration::from_secs_f64(DEFAULT_FLOW_TIMEOUT_SECONDS),
            flow_table: DEFAULT_FLOW_TABLE,
        }
    }

    /// The flow mode, with a flow table of `entries` and flows forgotten after `timeout`.
    pub fn flow(timeout: Duration, entries: u32) -> Self {
        UdpSettings {
            mode: UdpMode::Flow,
            flow_timeout: timeout,
            flow_table: entries,
            ..UdpSettings::datagram()
        }
    }

    /// The sizes of the maps its program is loaded with.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes::for_datagrams(self.flow_table)
    }

    /// A validated group's settings.
    pub fn of(spec: &GroupSpec) -> Self {
        UdpSettings {
            mode: spec.udp_mode,
            flow_timeout: Duration::from_secs_f64(spec.flow_timeout),
            flow_table: spec.flow_table,
            ..UdpSettings::datagram()
        }
    }
}

/// A flow in the table, as `parsrv status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub slot: u32,
    /// How long ago its last datagram came.
    pub idle: Duration,
}

/// An entry of the table, as `parsrv status` counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub slot: u32,
    /// How long ago its last datagram came.
    pub idle: Duration,
}

/// The table a mode keeps (aya reads an LRU_HASH as a HashMap).
enum Table {
    /// Flow mode: flows by 4-tuple.
    Flows(HashMap<MapData, FlowKey, FlowEntry>),
    /// Quic mode: first flights by destination connection ID.
    FirstFlights(HashMap<MapData, FirstFlightKey, FlowEntry>),
}

/// The loaded program and its maps.
pub struct DatagramSteering {
    loaded: Loaded,
    program: Program,
    sockets: ReusePortSockArray<MapData>,
    slot_by_cookie: HashMap<MapData, u64, u32>,
    slot_counters: PerCpuArray<MapData, UdpSlotCounters>,
    errors: PerCpuArray<MapData, UdpErrors>,
    config_map: Array<MapData, UdpConfig>,
    /// Flow and quic modes: the LRU table.
    table: Option<Table>,
    /// Flow and quic modes: what the program did to the table (None for a group an older
    /// parsrv pinned without them).
    table_counters: Option<PerCpuArray<MapData, UdpTableCounters>>,
    config: UdpConfig,
    /// Program and maps pinned in a staging directory, and where they go once published.
    staged: Option<(Pins, PathBuf)>,
}

impl DatagramSteering {
    /// Loads the program of `settings.mode`, with the running kernel's offsets. With
    /// `pin_dir`, the program and its maps are pinned at once into a staging directory
    /// beside it, which [`DatagramSteering::publish_pins`] renames to `pin_dir` in one step
    /// and which is removed if anything fails before (as [`super::reuseport::Steering::load`]
    /// does). Without (tests of the program alone), nothing is pinned.
    pub fn load(settings: UdpSettings, pin_dir: Option<&Path>) -> Result<Self> {
        let offsets = kernel::udp_offsets_in(&kernel::vmlinux_btf()?)?;
        let program_kind = Program::for_udp(settings.mode);
        let what = program_kind.name();
        let bytes = object(program_kind.object())?;
        let mut ebpf = loader::load(&bytes, settings.map_sizes())
            .map_err(Error::ebpf(format!("loading the {what} eBPF object")))?;
        let program: &mut SkReuseport = ebpf
            .program_mut(program_kind.name())
            .ok_or_else(|| missing(what, program_kind.name()))?
            .try_into()
            .map_err(Error::ebpf(format!(
                "the {what} program has the wrong type"
            )))?;
        loader::load_program(program).map_err(|e| verification::refusal(program_kind, e))?;
        let staged = pin_dir.map(Pins::staging).transpose()?;
        // The program too: a spawner that adopts the group attaches it again and reads its
        // info.
        if let Some(staged) = &staged {
            program
                .pin(staged.0.join(program_kind.name()))
                .map_err(Error::ebpf(format!("pinning the {what} program")))?;
        }
        let mut take = |name: &str| -> Result<aya::maps::Map> {
            let map = ebpf.take_map(name).ok_or_else(|| missing(what, name))?;
            if let Some(staged) = &staged {
                map.pin(staged.0.join(name))
                    .map_err(Error::ebpf(format!("pinning map {name}")))?;
            }
            Ok(map)
        };
        let typed = |name: &'static str| Error::ebpf(format!("map {name} has the wrong type"));
        let sockets = take(names::SOCKETS)?
            .try_into()
            .map_err(typed(names::SOCKETS))?;
        let slot_by_cookie = take(names::SLOT_BY_COOKIE)?
            .try_into()
            .map_err(typed(names::SLOT_BY_COOKIE))?;
        let slot_counters = take(names::SLOT_COUNTERS)?
            .try_into()
            .map_err(typed(names::SLOT_COUNTERS))?;
        let errors = take(names::ERRORS)?
            .try_into()
            .map_err(typed(names::ERRORS))?;
        let config_map = take(names::CONFIG)?
            .try_into()
            .map_err(typed(names::CONFIG))?;
        let table = match settings.mode {
            UdpMode::Datagram => None,
            UdpMode::Flow => Some(Table::Flows(
                take(names::FLOWS)?
                    .try_into()
                    .map_err(typed(names::FLOWS))?,
            )),
            UdpMode::Quic => Some(Table::FirstFlights(
                take(names::FIRST_FLIGHTS)?
                    .try_into()
                    .map_err(typed(names::FIRST_FLIGHTS))?,
            )),
        };
        let table_counters = match settings.mode {
            UdpMode::Datagram => None,
            UdpMode::Flow | UdpMode::Quic => Some(
                take(names::TABLE_COUNTERS)?
                    .try_into()
                    .map_err(typed(names::TABLE_COUNTERS))?,
            ),
        };
        let mut steering = DatagramSteering {
            loaded: Loaded::Object(ebpf),
            program: program_kind,
            sockets,
            slot_by_cookie,
            slot_counters,
            errors,
            config_map,
            table,
            table_counters,
            config: udp_config(offsets, &settings, 1),
            staged: staged.zip(pin_dir.map(Path::to_owned)),
        };
        steering.write_config()?;
        Ok(steering)
    }

    /// Takes over the program and maps a running UDP group pinned at `pin_dir` (its spawner
    /// is gone): the flow table and the counters go on where they were. CONFIG is written
    /// anew from `settings` (the caller checked they are the running group's) under the next
    /// generation, so the program drops what it remembered of the group's sockets.
    pub fn adopt(settings: UdpSettings, pin_dir: &Path) -> Result<Self> {
        let offsets = kernel::udp_offsets_in(&kernel::vmlinux_btf()?)?;
        let program_kind = Program::for_udp(settings.mode);
        let config_map: Array<MapData, UdpConfig> = pinned(pin_dir, names::CONFIG)?;
        let running = config_map
            .get(&0, 0)
            .map_err(Error::ebpf("reading the UDP program's CONFIG"))?;
        let program = SkReuseport::from_pin(
            pin_dir.join(program_kind.name()),
            aya::programs::SkReuseportAttachType::Select,
        )
        .map_err(Error::ebpf(format!(
            "opening the pinned {} program (is the group running in another --udp-mode?)",
            program_kind.name()
        )))?;
        let table = match settings.mode {
            UdpMode::Datagram => None,
            UdpMode::Flow => Some(Table::Flows(pinned(pin_dir, names::FLOWS)?)),
            UdpMode::Quic => Some(Table::FirstFlights(pinned(pin_dir, names::FIRST_FLIGHTS)?)),
        };
        let table_counters = match settings.mode {
            UdpMode::Datagram => None,
            // The program of a parsrv before UDP_TABLE_COUNTERS has none to pin.
            UdpMode::Flow | UdpMode::Quic if pin_dir.join(names::TABLE_COUNTERS).exists() => {
                Some(pinned(pin_dir, names::TABLE_COUNTERS)?)
            }
            UdpMode::Flow | UdpMode::Quic => None,
        };
        let mut steering = DatagramSteering {
            loaded: Loaded::Adopted(Box::new(program)),
            program: program_kind,
            sockets: pinned(pin_dir, names::SOCKETS)?,
            slot_by_cookie: pinned(pin_dir, names::SLOT_BY_COOKIE)?,
            slot_counters: pinned(pin_dir, names::SLOT_COUNTERS)?,
            errors: pinned(pin_dir, names::ERRORS)?,
            config_map,
            table,
            table_counters,
            config: udp_config(
                offsets,
                &settings,
                running.generation.wrapping_add(1).max(1),
            ),
            staged: None,
        };
        steering.write_config()?;
        Ok(steering)
    }

    /// Moves the staged pins to the directory given to [`DatagramSteering::load`]. The
    /// returned guard removes them when dropped.
    pub fn publish_pins(&mut self) -> Result<Option<Pins>> {
        let Some((staged, dir)) = self.staged.take() else {
            return Ok(None);
        };
        staged.publish(dir).map(Some)
    }

    /// Forgets the socket with `cookie` as slot `slot`'s: it closed (its handler died while
    /// no spawner held a copy) and a new socket takes the slot. The kernel took the closed
    /// socket out of SOCKETS itself.
    pub fn unregister(&mut self, slot: u32, cookie: u64) -> Result<()> {
        match self.slot_by_cookie.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::ebpf(format!(
                "forgetting the closed UDP socket of slot {slot}"
            ))(e)),
        }
    }

    fn program(&self) -> &SkReuseport {
        match &self.loaded {
            Loaded::Object(ebpf) => ebpf
                .program(self.program.name())
                .and_then(|p| p.try_into().ok())
                .expect("loaded in DatagramSteering::load"),
            Loaded::Adopted(program) => program,
        }
    }

    fn write_config(&mut self) -> Result<()> {
        self.config_map
            .set(0, self.config, 0)
            .map_err(Error::ebpf("writing the UDP program's CONFIG"))
    }

    /// Makes `socket` (bound, SO_REUSEPORT, unconnected) selectable as `slot`.
    pub fn register(&mut self, slot: u32, socket: &impl AsFd) -> Result<()> {
        if slot >= MAX_SOCKETS {
            return Err(Error::ebpf(format!("registering UDP slot {slot}"))(
                anyhow::anyhow!("slots are 0 to {}", MAX_SOCKETS - 1),
            ));
        }
        let context = format!("registering the UDP socket of slot {slot}");
        let cookie = kernel::socket_cookie(socket.as_fd())
            .map_err(|e| Error::ebpf(context.clone())(anyhow::anyhow!("SO_COOKIE: {e}")))?;
        self.slot_by_cookie
            .insert(cookie, slot, 0)
            .map_err(Error::ebpf(context.clone()))?;
        self.sockets
            .set(slot, &socket.as_fd(), 0)
            .map_err(Error::ebpf(context))?;
        self.config.generation = self.config.generation.wrapping_add(1).max(1);
        self.write_config()
    }

    /// Names a socket's `cookie` as slot `slot`'s before the socket joins the kernel's group
    /// (bind()): the program then knows it from its first datagram. [`Self::register`]
    /// completes it once bound.
    pub fn register_cookie(&mut self, slot: u32, cookie: u64) -> Result<()> {
        self.slot_by_cookie
            .insert(cookie, slot, 0)
            .map_err(Error::ebpf(format!(
                "registering the cookie of UDP slot {slot}"
            )))
    }

    /// Forgets slot `slot`'s socket, which leaves the group (a step down): its cookie goes,
    /// and the program's cached view of the group with the next generation. The kernel
    /// takes the socket out of SOCKETS when it closes.
    pub fn forget(&mut self, slot: u32, cookie: u64) -> Result<()> {
        self.unregister(slot, cookie)?;
        self.config.generation = self.config.generation.wrapping_add(1).max(1);
        self.write_config()
    }

    /// Attaches the program to the reuseport group `member` belongs to (again, for an
    /// adopted group: the same program replaces itself).
    pub fn attach(&mut self, member: &impl AsFd) -> Result<()> {
        let what = self.program.name();
        // The kernel keeps the program with the group; closing the sockets detaches it.
        self.program()
            .attach(member.as_fd())
            .map_err(Error::ebpf(format!(
                "attaching the {what} program to the socket group"
            )))
    }

    /// The flows in the table (flow mode; none in the other modes), idle or not: one map
    /// lookup per flow, never on the datagrams' path. At most `limit`.
    pub fn flows(&self, limit: usize) -> Result<Vec<Flow>> {
        let Some(Table::Flows(table)) = &self.table else {
            return Ok(Vec::new());
        };
        let now = monotonic_ns();
        let mut flows = Vec::new();
        for item in table.iter().take(limit) {
            // A flow forgotten between the key's read and its value's is skipped.
            let Ok((key, entry)) = item else { continue };
            flows.push(Flow {
                key,
                slot: entry.slot,
                idle: Duration::from_nanos(now.saturating_sub(entry.last_ns)),
            });
        }
        Ok(flows)
    }

    /// The entries of the table (flows, or QUIC first flights; none in datagram mode), idle
    /// or not, for `status`: one map lookup each. At most `limit`.
    pub fn placed(&self, limit: usize) -> Result<Vec<Placed>> {
        let now = monotonic_ns();
        let placed = |entry: FlowEntry| Placed {
            slot: entry.slot,
            idle: Duration::from_nanos(now.saturating_sub(entry.last_ns)),
        };
        // An entry forgotten between the key's read and its value's is skipped.
        Ok(match &self.table {
            None => Vec::new(),
            Some(Table::Flows(table)) => table
                .iter()
                .take(limit)
                .filter_map(|item| item.ok().map(|(_, entry)| placed(entry)))
                .collect(),
            Some(Table::FirstFlights(table)) => table
                .iter()
                .take(limit)
                .filter_map(|item| item.ok().map(|(_, entry)| placed(entry)))
                .collect(),
        })
    }

    /// Flow and quic modes: how long an entry of the table may be idle before its next
    /// datagram is placed again.
    pub fn flow_timeout(&self) -> Option<Duration> {
        self.table
            .as_ref()
            .map(|_| Duration::from_nanos(self.config.flow_idle_ns))
    }

    /// Per-slot counters summed over CPUs, for slots `0..slots`.
    pub fn slot_counters(&self, slots: u32) -> Result<Vec<UdpSlotCounters>> {
        (0..slots)
            .map(|slot| {
                sum_over_cpus(
                    &self.slot_counters,
                    slot,
                    UdpSlotCounters::add,
                    names::SLOT_COUNTERS,
                )
            })
            .collect()
    }

    /// Flow and quic modes: what the program did to its table, summed over CPUs (None in
    /// datagram mode, and for a group an older parsrv pinned without the counters).
    pub fn table_counters(&self) -> Result<Option<UdpTableCounters>> {
        self.table_counters
            .as_ref()
            .map(|map| sum_over_cpus(map, 0, UdpTableCounters::add, names::TABLE_COUNTERS))
            .transpose()
    }

    /// Internal errors (each a datagram left to the kernel's hash), summed over CPUs.
    pub fn errors(&self) -> Result<UdpErrors> {
        sum_over_cpus(&self.errors, 0, UdpErrors::add, names::ERRORS)
    }

    /// The program's id, runs and run time (with kernel.bpf_stats_enabled=1), and what the
    /// verifier spent on it (Linux 5.16+).
    pub fn run_stats(&self) -> Result<RunStats> {
        let what = self.program.name();
        let info = self
            .program()
            .info()
            .map_err(Error::ebpf(format!("reading the {what} program's info")))?;
        Ok(RunStats::of(&info))
    }
}

/// CONFIG for `settings`, under `generation`.
fn udp_config(offsets: UdpOffsets, settings: &UdpSettings, generation: u32) -> UdpConfig {
    UdpConfig {
        offsets,
        reserve: settings.reserve,
        generation,
        _pad: 0,
        flow_idle_ns: settings.flow_timeout.as_nanos().min(u64::MAX as u128) as u64,
    }
}

fn missing(object: &str, name: &str) -> Error {
    Error::ebpf(format!("the {object} eBPF object is not this parsrv's"))(anyhow::anyhow!(
        "it has no {name}: rebuild it with `cargo xtask build`"
    ))
}
