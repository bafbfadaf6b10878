//! One aya loader per process.
//!
//! aya 0.14 parses the running kernel's BTF in every `EbpfLoader::new()`, whether the object
//! needs it or not. A spawner's start loads the object up to three times (the verification
//! check of each program its groups need, then each group's own load), a cluster agent's
//! twice, `parsrv kernel` three times. One loader, made on the first load, serves them all:
//! `parsrv kernel` went from 0.17 to 0.15 s here and from 1.5 to 1.25 s in a 6.12 VM under
//! TCG (debug build, 3 interleaved runs each, 2026-12-05); a spawner's RSS did not grow.
//!
//! A loader keeps the map sizes it was given, so every load states the size of every map
//! sized at run time ([`MapSizes`]); none leaks from one load into the next.
//!
//! A loader also keeps the pins it was told to take maps from, and aya has no way to forget
//! one: so loads that take maps from a group's pins ([`load_sharing`]) have a loader of
//! their own, made on the first such load (a group on several addresses), and every such load
//! names every pin it takes. The first loader never takes a map from a pin.
//!
//! The verification check before a spawner's start loads each program its groups need
//! ([`super::verification::check_and_keep`]). The verifier's walk of a program is the bulk
//! of that start (47 % of a TCP spawner's CPU on 6.18, half of it in the check's load), so
//! the check keeps what it loaded ([`keep_verified`]) and the next [`load`] of the same
//! object at the same sizes takes it, program already loaded, instead of walking the program
//! again. The spawner forgets what no group took once its groups have started
//! ([`forget_verified`]).

use std::{
    path::PathBuf,
    sync::{LazyLock, Mutex, PoisonError},
};

use aya::{
    programs::{ProgramError, SkReuseport},
    Ebpf, EbpfError, EbpfLoader,
};
use parsrv_common::{cluster, reuseport, udp};

/// The maps whose size is chosen at load time. The defaults are the sizes the eBPF crate
/// declares (`with_max_entries(1, ..)`, `with_byte_size(4096, ..)`): the smallest each
/// takes, enough to load and verify the programs. Change both together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of a group's dispatch table (client affinity).
    pub dispatch_table: u32,
    /// Entries of a cluster's client table.
    pub cluster_clients: u32,
    /// Bytes of a cluster's ring of decisions (a power of two, a multiple of the page).
    pub cluster_decisions: u32,
    /// Entries of a UDP group's flow table (flow mode), or of its first flights (quic mode).
    pub udp_flows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            dispatch_table: 1,
            cluster_clients: 1,
            cluster_decisions: 4096,
            udp_flows: 1,
        }
    }
}

impl MapSizes {
    /// A TCP group's: its dispatch table of `dispatch_table` entries (1 without affinity).
    pub fn for_connections(dispatch_table: u32) -> Self {
        MapSizes {
            dispatch_table,
            ..Default::default()
        }
    }

    /// A UDP group's: its flow (or first-flight) table of `udp_flows` entries.
    pub fn for_datagrams(udp_flows: u32) -> Self {
        MapSizes {
            udp_flows,
            ..Default::default()
        }
    }
}

/// An object loaded by the verification check, its program loaded, waiting for the group
/// load that asks for the same object at the same sizes.
struct Verified {
    object: Box<[u8]>,
    sizes: MapSizes,
    ebpf: Ebpf,
}

static VERIFIED: Mutex<Vec<Verified>> = Mutex::new(Vec::new());

/// Keeps `ebpf`, which the verification check loaded from `object` at `sizes` with its
/// program loaded, for the next [`load`] of the same object at the same sizes.
pub fn keep_verified(object: &[u8], sizes: MapSizes, ebpf: Ebpf) {
    let mut verified = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
    verified.push(Verified {
        object: object.into(),
        sizes,
        ebpf,
    });
}

/// Closes what the verification check loaded and no group took (its programs and maps).
pub fn forget_verified() {
    VERIFIED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

fn take_verified(object: &[u8], sizes: MapSizes) -> Option<Ebpf> {
    let mut verified = VERIFIED.lock().unwrap_or_else(PoisonError::into_inner);
    let index = verified
        .iter()
        .position(|v| v.sizes == sizes && *v.object == *object)?;
    Some(verified.swap_remove(index).ebpf)
}

static LOADER: LazyLock<Mutex<EbpfLoader<'static>>> =
    LazyLock::new(|| Mutex::new(EbpfLoader::new()));

static SHARING_LOADER: LazyLock<Mutex<EbpfLoader<'static>>> =
    LazyLock::new(|| Mutex::new(EbpfLoader::new()));

/// Loads `object` (creating its maps and relocating its programs, loading none of them) with
/// the map sizes `sizes`; or returns what the verification check kept of it at those sizes,
/// its program already loaded (so load programs with [`load_program`]).
pub fn load(object: &[u8], sizes: MapSizes) -> Result<Ebpf, EbpfError> {
    if let Some(ebpf) = take_verified(object, sizes) {
        return Ok(ebpf);
    }
    load_fresh(object, sizes)
}

/// Loads `object` as [`load`] does, never taking what the check kept.
pub fn load_fresh(object: &[u8], sizes: MapSizes) -> Result<Ebpf, EbpfError> {
    // A panic while the lock was held left no half-made state: every field this module uses
    // is set again below.
    let mut loader = LOADER.lock().unwrap_or_else(PoisonError::into_inner);
    loader
        .map_max_entries(reuseport::names::DISPATCH_TABLE, sizes.dispatch_table)
        .map_max_entries(cluster::names::CLIENTS, sizes.cluster_clients)
        .map_max_entries(cluster::names::DECISIONS, sizes.cluster_decisions)
        .map_max_entries(udp::names::FLOWS, sizes.udp_flows)
        .map_max_entries(udp::names::FIRST_FLIGHTS, sizes.udp_flows)
        .load(object)
}

/// Loads `object` as [`load`] does, with its read-only global `name` set to `value`. The
/// loader keeps the value for later loads too, where objects without that global ignore it.
pub fn load_with_global(
    object: &[u8],
    sizes: MapSizes,
    name: &'static str,
    value: &'static [u8],
) -> Result<Ebpf, EbpfError> {
    {
        let mut loader = LOADER.lock().unwrap_or_else(PoisonError::into_inner);
        // Not `must_exist`: the loader keeps it, and the next object may be another.
        loader.override_global(name, value, false);
    }
    load_fresh(object, sizes)
}

/// Loads `program` into the kernel, unless it came loaded from the verification check.
pub fn load_program(program: &mut SkReuseport) -> Result<(), ProgramError> {
    if program.fd().is_ok() {
        return Ok(());
    }
    program.load()
}

/// Loads `object` as [`load`] does, its maps at the sizes the object declares, except that
/// each map named in `shared` is not created but opened from the pin given beside it: so this
/// object's programs work on the same maps as another object's. `shared` must name the same maps on every call
/// (the loader keeps pins from one call to the next), and every pin must exist: a missing
/// one would be created and pinned by aya, hence the check.
pub fn load_sharing(object: &[u8], shared: &[(&'static str, PathBuf)]) -> Result<Ebpf, EbpfError> {
    if let Some((name, path)) = shared.iter().find(|(_, path)| !path.exists()) {
        return Err(EbpfError::FileError {
            path: path.clone(),
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the pin of map {name}, which this object shares, is missing"),
            ),
        });
    }
    let mut loader = SHARING_LOADER
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for (name, path) in shared {
        loader.map_pin_path(name, path.clone());
    }
    loader.load(object)
}
