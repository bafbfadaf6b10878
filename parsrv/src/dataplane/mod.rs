//! The data plane: parsrv's eBPF programs and the kernel objects they keep, one module per
//! program ([`reuseport`], [`lookup`], [`cluster`], [`audit`], [`udp`]), the pinned state that
//! outlives a process ([`pins`] for a group's maps, [`netns`] for what belongs to a network
//! namespace), and the table of embedded objects and of what each program needs from the
//! kernel (this module).
//!
//! # Where the truth lives
//!
//! In one table, `docs/design.md` ("Where the truth lives"), which a test checks against the
//! names and paths used here.
//!
//! So a new spawner finds a whole group from the pins, the run directory and the handlers'
//! fds, and adopts it (`spawner::adopt`), its clients' entries and addresses included. A new
//! program keeps to this split: a module here, its own object and its own `Program` entry.

pub mod affinity;
pub mod alerts;
pub mod audit;
pub mod cluster;
pub mod loader;
pub mod lookup;
pub mod netns;
pub mod pins;
pub mod reuseport;
pub mod udp;
pub mod verification;

use std::{borrow::Cow, fs, path::Path};

use crate::{
    error::{Error, Result},
    features::Feature,
    spec::UdpMode,
};

/// CLOCK_MONOTONIC in ns: the clock of the programs' `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// Element `index` of a per-CPU map of counters, summed over the CPUs with `add` (the
/// `counters!` struct's own).
pub(crate) fn sum_over_cpus<T: aya::Pod + Default>(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, T>,
    index: u32,
    add: fn(&mut T, &T),
    name: &str,
) -> Result<T> {
    let per_cpu = map
        .get(&index, 0)
        .map_err(Error::ebpf(format!("reading {name}")))?;
    let mut sum = T::default();
    per_cpu.iter().for_each(|c| add(&mut sum, c));
    Ok(sum)
}

/// An ELF object built from parsrv-ebpf and embedded in this binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfObject {
    /// `parsrv-ebpf`'s `parsrv` binary: the SK_REUSEPORT program of every group.
    Parsrv,
    /// `parsrv-ebpf`'s `address-lookup` binary: the sk_lookup program of a group on several
    /// addresses, on the maps the `parsrv` object's program shares with it.
    AddressLookup,
    /// `parsrv-ebpf`'s `cluster-dispatch` binary: the cluster's host dispatcher alone.
    ClusterDispatch,
    /// `parsrv-ebpf`'s `reuseport-audit` binary: the watchdog's iterator alone.
    ReuseportAudit,
    /// `parsrv-ebpf`'s `udp-datagram` binary: the SK_REUSEPORT program of a UDP group in
    /// datagram mode.
    UdpDatagram,
    /// `parsrv-ebpf`'s `udp-flow` binary: the SK_REUSEPORT program of a UDP group in flow
    /// mode.
    UdpFlow,
    /// `parsrv-ebpf`'s `udp-quic` binary: the SK_REUSEPORT program of a UDP group in quic
    /// mode.
    UdpQuic,
}

impl EbpfObject {
    /// The object as built; empty when the eBPF build was skipped (see build.rs).
    fn embedded(self) -> &'static [u8] {
        match self {
            EbpfObject::Parsrv => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/parsrv-ebpf.o"))
            }
            EbpfObject::AddressLookup => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/address-lookup.o"))
            }
            EbpfObject::ClusterDispatch => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cluster-dispatch.o"))
            }
            EbpfObject::ReuseportAudit => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-audit.o"))
            }
            EbpfObject::UdpDatagram => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp-datagram.o"))
            }
            EbpfObject::UdpFlow => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp-flow.o"))
            }
            EbpfObject::UdpQuic => {
                aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp-quic.o"))
            }
        }
    }
}

/// Loads the `parsrv` object from this file instead of the embedded one (for working on the
/// programs without rebuilding parsrv; also how the tests feed it a broken object).
pub const OBJECT_ENV: &str = "PARSRV_EBPF_OBJECT";

/// An eBPF program parsrv loads: which object it is in, what it needs from the kernel, and
/// what it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Picks a socket with room for each new connection to a group ([`reuseport`]).
    ReuseportSelect,
    /// Moves a connection from a full address of a group to another, and serves prefixes
    /// and port ranges ([`lookup`]).
    AddressLookup,
    /// The host dispatcher of a cluster ([`cluster`]).
    ClusterDispatch,
    /// Tells which program each reuseport group of the namespace runs, for the watchdog
    /// ([`audit`]). Loaded by the watchdog after the start, not checked before it: a kernel
    /// without it runs groups unaudited, and says so.
    ReuseportAudit,
    /// Sends each datagram to a UDP group's socket with receive-buffer room ([`udp`]).
    UdpDatagram,
    /// Places each new flow of a UDP group on a socket with receive-buffer room, and keeps
    /// the flow there ([`udp`]).
    UdpFlow,
    /// Sends each QUIC packet of a UDP group to the socket its connection ID's cookie names,
    /// and places first flights by room ([`udp`]).
    UdpQuic,
}

impl Program {
    pub const ALL: [Program; 7] = [
        Program::ReuseportSelect,
        Program::AddressLookup,
        Program::ClusterDispatch,
        Program::ReuseportAudit,
        Program::UdpDatagram,
        Program::UdpFlow,
        Program::UdpQuic,
    ];

    /// What groups may need (`parsrv run`, `parsrv kernel`'s verdict).
    pub const GROUPS: [Program; 5] = [
        Program::ReuseportSelect,
        Program::AddressLookup,
        Program::UdpDatagram,
        Program::UdpFlow,
        Program::UdpQuic,
    ];

    /// The program a UDP group in `mode` runs.
    pub fn for_udp(mode: UdpMode) -> Program {
        match mode {
            UdpMode::Datagram => Program::UdpDatagram,
            UdpMode::Flow => Program::UdpFlow,
            UdpMode::Quic => Program::UdpQuic,
        }
    }

    /// Its name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Program::ReuseportSelect => parsrv_common::reuseport::names::PROGRAM,
            Program::AddressLookup => parsrv_common::lookup::names::PROGRAM,
            Program::ClusterDispatch => parsrv_common::cluster::names::PROGRAM,
            Program::ReuseportAudit => parsrv_common::audit::names::PROGRAM,
            Program::UdpDatagram => parsrv_common::udp::names::PROGRAM,
            Program::UdpFlow => parsrv_common::udp::names::FLOW_PROGRAM,
            Program::UdpQuic => parsrv_common::udp::names::QUIC_PROGRAM,
        }
    }

    pub fn object(self) -> EbpfObject {
        match self {
            Program::ReuseportSelect => EbpfObject::Parsrv,
            Program::AddressLookup => EbpfObject::AddressLookup,
            Program::ClusterDispatch => EbpfObject::ClusterDispatch,
            Program::ReuseportAudit => EbpfObject::ReuseportAudit,
            Program::UdpDatagram => EbpfObject::UdpDatagram,
            Program::UdpFlow => EbpfObject::UdpFlow,
            Program::UdpQuic => EbpfObject::UdpQuic,
        }
    }

    /// The kernel features it cannot run without, in the order a missing one is reported
    /// (BTF first: the others are probed through it).
    pub fn requires(self) -> &'static [Feature] {
        // features' test checks that no feature is left unused.
        match self {
            Program::ReuseportSelect => &[
                Feature::Btf,
                Feature::SkReuseport,
                Feature::CapBpf,
                Feature::SelectOrMigrate,
                Feature::ReuseportCtxSk,
                Feature::TcpMigrateReq,
                Feature::BpfLoop,
            ],
            // It reads queues with probe reads (CAP_PERFMON) and scans with bpf_loop.
            Program::AddressLookup => &[
                Feature::Btf,
                Feature::CapBpf,
                Feature::BpfLoop,
                Feature::SkLookup,
            ],
            Program::ClusterDispatch => &[
                Feature::Btf,
                Feature::CapBpf,
                Feature::BpfLoop,
                Feature::Tcx,
            ],
            Program::ReuseportAudit => &[Feature::Btf, Feature::CapBpf, Feature::TcpIter],
            // It reads `ctx->sk` (5.14+) and receive buffers with probe reads, and scans with
            // bpf_loop; no migration (TCP only). The flow program also reads the datagram's
            // addresses (bpf_skb_load_bytes_relative, 4.18) and keeps an LRU map (4.10); the
            // quic program reads the packet (bpf_skb_load_bytes) and keeps one too.
            Program::UdpDatagram | Program::UdpFlow | Program::UdpQuic => &[
                Feature::Btf,
                Feature::SkReuseport,
                Feature::CapBpf,
                Feature::ReuseportCtxSk,
                Feature::BpfLoop,
            ],
        }
    }
}

/// The programs a spawner needs for `groups`: the reuseport program for TCP groups (and
/// when there is none at all), the lookup program for a group on several addresses, a
/// prefix or a port range, the datagram, flow or quic program for UDP groups, by their mode.
pub fn programs_for_groups(groups: &[crate::spec::GroupSpec]) -> Vec<Program> {
    let udp = |g: &crate::spec::GroupSpec| g.is_udp();
    let mut programs = Vec::new();
    if !groups.iter().all(udp) || groups.is_empty() {
        programs.push(Program::ReuseportSelect);
    }
    if groups.iter().any(crate::spec::GroupSpec::needs_lookup) {
        programs.push(Program::AddressLookup);
    }
    for mode in [UdpMode::Datagram, UdpMode::Flow, UdpMode::Quic] {
        if groups.iter().any(|g| udp(g) && g.udp_mode == mode) {
            programs.push(Program::for_udp(mode));
        }
    }
    programs
}

/// What a spawner's verification check loads for `groups`: each of
/// [`programs_for_groups`], with the map sizes of the first group that loads it through
/// [`loader::load`] (that group's load then takes the check's), or None for the lookup
/// program, which a group loads on its maps' pins instead.
pub fn verification_loads(
    groups: &[crate::spec::GroupSpec],
) -> Vec<(Program, Option<loader::MapSizes>)> {
    let sizes_of = |spec: &crate::spec::GroupSpec| {
        if spec.is_udp() {
            udp::UdpSettings::of(spec).map_sizes()
        } else {
            loader::MapSizes::for_connections(spec.dispatch_table_size())
        }
    };
    programs_for_groups(groups)
        .into_iter()
        .map(|program| {
            let first = groups.iter().find(|g| match program {
                Program::ReuseportSelect => !g.is_udp(),
                Program::UdpDatagram | Program::UdpFlow | Program::UdpQuic => {
                    g.is_udp() && Program::for_udp(g.udp_mode) == program
                }
                _ => false,
            });
            (program, first.map(sizes_of))
        })
        .collect()
}

/// The bytes of `object`: the file named by [`OBJECT_ENV`], or the embedded one.
pub fn object(object: EbpfObject) -> Result<Cow<'static, [u8]>> {
    let bytes = match std::env::var_os(OBJECT_ENV).filter(|_| object == EbpfObject::Parsrv) {
        Some(path) => Cow::Owned(fs::read(&path).map_err(Error::io(format!(
            "reading the eBPF object {} ({OBJECT_ENV})",
            Path::new(&path).display()
        )))?),
        None => Cow::Borrowed(object.embedded()),
    };
    if bytes.is_empty() {
        return Err(Error::NoEbpfObject);
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Err(Error::ebpf("the eBPF object is not an ELF file")(
            anyhow::anyhow!("rebuild it with `cargo xtask build`"),
        ));
    }
    Ok(bytes)
}

/// Checks that every program's object is there, before anything is created.
pub fn check_objects(programs: &[Program]) -> Result<()> {
    programs
        .iter()
        .try_for_each(|p| object(p.object()).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{GroupSpec, HandlerKind};

    fn group(listen: &str) -> GroupSpec {
        GroupSpec::new(listen.parse().unwrap(), HandlerKind::Echo)
    }

    #[test]
    fn a_spawner_loads_only_the_programs_its_groups_use() {
        let tcp = group("127.0.0.1:80");
        let range = group("127.0.0.0/29:80");
        let udp = group("udp://127.0.0.1:53");
        let flows = GroupSpec {
            udp_mode: UdpMode::Flow,
            ..group("udp://127.0.0.1:443")
        };
        assert_eq!(
            programs_for_groups(std::slice::from_ref(&tcp)),
            [Program::ReuseportSelect]
        );
        assert_eq!(
            programs_for_groups(std::slice::from_ref(&udp)),
            [Program::UdpDatagram]
        );
        assert_eq!(
            programs_for_groups(std::slice::from_ref(&flows)),
            [Program::UdpFlow]
        );
        let quic = GroupSpec {
            udp_mode: UdpMode::Quic,
            ..group("udp://127.0.0.1:4433")
        };
        assert_eq!(
            programs_for_groups(std::slice::from_ref(&quic)),
            [Program::UdpQuic]
        );
        assert_eq!(
            programs_for_groups(&[tcp, range, udp, flows]),
            [
                Program::ReuseportSelect,
                Program::AddressLookup,
                Program::UdpDatagram,
                Program::UdpFlow
            ]
        );
        assert_eq!(programs_for_groups(&[]), [Program::ReuseportSelect]);
    }

    #[test]
    fn the_verification_check_loads_each_program_at_the_sizes_its_first_group_loads_it_with() {
        use crate::spec::Affinity;
        let plain = group("127.0.0.1:80");
        let affine = GroupSpec {
            affinity: Affinity::Client,
            affinity_table: 4096,
            ..group("127.0.0.1:81")
        };
        let range = group("127.0.0.0/29:82");
        let flows = GroupSpec {
            udp_mode: UdpMode::Flow,
            flow_table: 777,
            ..group("udp://127.0.0.1:443")
        };
        let quic = GroupSpec {
            udp_mode: UdpMode::Quic,
            flow_table: 555,
            ..group("udp://127.0.0.1:4433")
        };
        assert_eq!(
            verification_loads(&[
                affine.clone(),
                plain.clone(),
                range,
                flows.clone(),
                quic.clone()
            ]),
            [
                // The first TCP group's sizes: the one whose load takes the check's.
                (
                    Program::ReuseportSelect,
                    Some(loader::MapSizes::for_connections(4096))
                ),
                (Program::AddressLookup, None),
                (Program::UdpFlow, Some(loader::MapSizes::for_datagrams(777))),
                (Program::UdpQuic, Some(loader::MapSizes::for_datagrams(555))),
            ]
        );
        // What the groups' own loads ask for (Steering::load, DatagramSteering::load).
        assert_eq!(
            loader::MapSizes::for_connections(plain.dispatch_table_size()),
            loader::MapSizes::default()
        );
        assert_eq!(
            udp::UdpSettings::of(&flows).map_sizes(),
            loader::MapSizes::for_datagrams(777)
        );
        assert_eq!(
            verification_loads(&[plain])[0],
            (Program::ReuseportSelect, Some(loader::MapSizes::default()))
        );
    }
}
