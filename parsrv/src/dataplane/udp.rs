//! The UDP datagram program's userspace (eBPF side: `parsrv-ebpf/src/bin/udp_datagram.rs`,
//! shared types: `parsrv_common::udp`): loading it, registering a UDP group's sockets,
//! attaching it, and reading its counters. Nothing is pinned yet: the program lives as long
//! as the sockets of its group (the kernel keeps an attached program with the group).

use std::os::fd::AsFd;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf,
};
use parsrv_common::udp::{
    names, UdpConfig, UdpErrors, UdpSlotCounters, DEFAULT_RESERVE, MAX_SOCKETS,
};

use super::{
    loader, object, reuseport::RunStats, sum_over_cpus, verification, EbpfObject, Program,
};
use crate::{
    error::{Error, Result},
    kernel,
};

/// The loaded program and its maps.
pub struct DatagramSteering {
    ebpf: Ebpf,
    sockets: ReusePortSockArray<MapData>,
    slot_by_cookie: HashMap<MapData, u64, u32>,
    slot_counters: PerCpuArray<MapData, UdpSlotCounters>,
    errors: PerCpuArray<MapData, UdpErrors>,
    config_map: Array<MapData, UdpConfig>,
    config: UdpConfig,
}

impl DatagramSteering {
    /// Loads the program, with the running kernel's offsets and a socket counted as having
    /// room while `reserve` bytes of its receive buffer are free (None: [`DEFAULT_RESERVE`]).
    pub fn load(reserve: Option<u32>) -> Result<Self> {
        let offsets = kernel::udp_offsets_in(&kernel::vmlinux_btf()?)?;
        let bytes = object(EbpfObject::UdpDatagram)?;
        let mut ebpf = loader::load(&bytes, Default::default())
            .map_err(Error::ebpf("loading the udp-datagram eBPF object"))?;
        let program: &mut SkReuseport = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| missing(names::PROGRAM))?
            .try_into()
            .map_err(Error::ebpf("the udp-datagram program has the wrong type"))?;
        program
            .load()
            .map_err(|e| verification::refusal(Program::UdpDatagram, e))?;
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| missing(name));
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
        let mut steering = DatagramSteering {
            ebpf,
            sockets,
            slot_by_cookie,
            slot_counters,
            errors,
            config_map,
            config: UdpConfig {
                offsets,
                reserve: reserve.unwrap_or(DEFAULT_RESERVE),
                generation: 1,
            },
        };
        steering.write_config()?;
        Ok(steering)
    }

    fn write_config(&mut self) -> Result<()> {
        self.config_map
            .set(0, self.config, 0)
            .map_err(Error::ebpf("writing the udp-datagram program's CONFIG"))
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

    /// Attaches the program to the reuseport group `member` belongs to.
    pub fn attach(&mut self, member: &impl AsFd) -> Result<()> {
        let program: &mut SkReuseport = self
            .ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| missing(names::PROGRAM))?
            .try_into()
            .map_err(Error::ebpf("the udp-datagram program has the wrong type"))?;
        // The kernel keeps the program with the group; the link aya returns is only a
        // handle for detaching, which closing the sockets does.
        program
            .attach(member.as_fd())
            .map(drop)
            .map_err(Error::ebpf(
                "attaching the udp-datagram program to the socket group",
            ))
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

    /// Internal errors (each a datagram left to the kernel's hash), summed over CPUs.
    pub fn errors(&self) -> Result<UdpErrors> {
        sum_over_cpus(&self.errors, 0, UdpErrors::add, names::ERRORS)
    }

    /// The program's id, runs and run time (with kernel.bpf_stats_enabled=1), and what the
    /// verifier spent on it (Linux 5.16+).
    pub fn run_stats(&self) -> Result<RunStats> {
        let info = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or_else(|| missing(names::PROGRAM))?
            .info()
            .map_err(Error::ebpf("reading the udp-datagram program's info"))?;
        Ok(RunStats::of(&info))
    }
}

fn missing(name: &str) -> Error {
    Error::ebpf("the udp-datagram eBPF object is not this parsrv's")(anyhow::anyhow!(
        "it has no {name}: rebuild it with `cargo xtask build`"
    ))
}
