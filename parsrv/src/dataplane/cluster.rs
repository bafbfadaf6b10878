//! The host dispatcher's userspace (eBPF side: `parsrv-ebpf/src/bin/cluster_dispatch.rs`, shared
//! types and design: `parsrv_common::cluster`): loads the tc program, attaches it to the interface
//! with a tcx link, and keeps the host's copy of the cluster's dispatch table, the hosts' MACs,
//! states and room.
//!
//! All of it is pinned under `/sys/fs/bpf/parsrv/_cluster-NAME-HOST/`, link included: a killed
//! agent leaves the dispatcher running on the last table it wrote, and a new agent adopts
//! the pins (tubular keeps its state the same way). Removing the directory detaches it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{links::FdLink, tc::SchedClassifierLink, SchedClassifier, TcAttachType},
};
use parsrv_common::cluster::{
    names, ClientEntry, ClusterConfig, Decision, DispatchCounters, Host, MAX_HOSTS,
};

use super::{
    loader::{self, MapSizes},
    object, pins, sum_over_cpus, EbpfObject,
};
use crate::error::{Error, Result};

/// Prefix of a cluster's directory under parsrv's bpffs directory (group names cannot start
/// with '_').
pub const DIR_PREFIX: &str = "_cluster-";

/// Where host `host`'s dispatcher of cluster `name` is pinned. (The host id is in the name
/// so that hosts simulated as network namespaces of one machine can share its bpffs.)
pub fn pin_dir(name: &str, host: u16) -> PathBuf {
    pins::root().join(format!("{DIR_PREFIX}{name}-{host}"))
}

/// The dispatcher's maps, as the agent keeps them.
pub struct Dispatcher {
    config: Array<MapData, ClusterConfig>,
    clients: HashMap<MapData, [u8; 4], ClientEntry>,
    hosts: Array<MapData, Host>,
    peer_macs: HashMap<MapData, [u8; 8], u16>,
    counters: PerCpuArray<MapData, DispatchCounters>,
    dir: PathBuf,
}

/// The maps pinned besides the link, in the order [`Dispatcher::from_maps`] takes them.
const MAPS: [&str; 5] = [
    names::CONFIG,
    names::CLIENTS,
    names::HOSTS,
    names::PEER_MACS,
    names::COUNTERS,
];

impl Dispatcher {
    /// Loads the program with a table of `capacity` clients, writes `config`, attaches it to
    /// `interface`'s ingress and pins everything at `dir` (filled beside it and renamed into
    /// place; nothing is left if a step fails). Also returns the ring of decisions to
    /// broadcast.
    pub fn load(
        config: ClusterConfig,
        capacity: u32,
        interface: &str,
        dir: &Path,
    ) -> Result<(Dispatcher, RingBuf<MapData>)> {
        let object = object(EbpfObject::ClusterDispatch)?;
        let sizes = MapSizes {
            cluster_clients: capacity,
            cluster_decisions: 256 * 1024,
            ..Default::default()
        };
        let mut ebpf = loader::load(&object, sizes)
            .map_err(Error::ebpf("loading the cluster's eBPF object"))?;
        let staging = pins::Pins::staging(dir)?;
        let mut take = |name: &str| -> Result<Map> {
            let map = ebpf.take_map(name).ok_or_else(|| missing(name))?;
            map.pin(staging.dir().join(name))
                .map_err(Error::ebpf(format!("pinning map {name}")))?;
            Ok(map)
        };
        let maps = MAPS.map(&mut take);
        let decisions: RingBuf<MapData> = take(names::DECISIONS)?
            .try_into()
            .map_err(Error::ebpf("map CLUSTER_DECISIONS has the wrong type"))?;
        let mut dispatcher = Dispatcher::from_maps(maps, dir)?;
        dispatcher
            .config
            .set(0, config, 0)
            .map_err(Error::ebpf("writing the dispatcher's config"))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| missing(names::PROGRAM))?
            .try_into()
            .map_err(Error::ebpf("the dispatcher program has the wrong type"))?;
        program
            .load()
            .map_err(|e| super::verification::refusal(super::Program::ClusterDispatch, e))?;
        let id = program
            .attach(interface, TcAttachType::Ingress)
            .map_err(Error::ebpf(format!(
                "attaching the dispatcher to {interface}'s ingress (tcx, Linux 6.6+)"
            )))?;
        let link: SchedClassifierLink = program
            .take_link(id)
            .map_err(Error::ebpf("taking the dispatcher's link"))?;
        let link = FdLink::try_from(link).map_err(Error::ebpf(
            "the dispatcher's link is not a tcx link (parsrv's cluster needs Linux 6.6+)",
        ))?;
        link.pin(staging.dir().join(names::LINK))
            .map_err(Error::ebpf("pinning the dispatcher's link"))?;
        // In place in one step; a pinned link keeps the program attached from now on.
        fs::rename(staging.dir(), dir).map_err(Error::io(format!(
            "moving the dispatcher's pins to {}",
            dir.display()
        )))?;
        std::mem::forget(staging);
        Ok((dispatcher, decisions))
    }

    /// Takes over the dispatcher pinned at `dir` (its agent is gone).
    pub fn adopt(dir: &Path) -> Result<(Dispatcher, RingBuf<MapData>)> {
        let open = |name: &str| -> Result<Map> {
            MapData::from_pin(dir.join(name))
                .map_err(Error::ebpf(format!("opening pinned map {name}")))
                .and_then(|data| {
                    Map::from_map_data(data)
                        .map_err(Error::ebpf(format!("pinned map {name} (wrong type?)")))
                })
        };
        let decisions = open(names::DECISIONS)?
            .try_into()
            .map_err(Error::ebpf("map CLUSTER_DECISIONS has the wrong type"))?;
        Ok((Dispatcher::from_maps(MAPS.map(open), dir)?, decisions))
    }

    fn from_maps(maps: [Result<Map>; 5], dir: &Path) -> Result<Dispatcher> {
        let [config, clients, hosts, peer_macs, counters] = maps;
        let typed = |name: &str| Error::ebpf(format!("map {name} has the wrong type"));
        Ok(Dispatcher {
            config: config?.try_into().map_err(typed(names::CONFIG))?,
            clients: clients?.try_into().map_err(typed(names::CLIENTS))?,
            hosts: hosts?.try_into().map_err(typed(names::HOSTS))?,
            peer_macs: peer_macs?.try_into().map_err(typed(names::PEER_MACS))?,
            counters: counters?.try_into().map_err(typed(names::COUNTERS))?,
            dir: dir.to_owned(),
        })
    }

    pub fn config(&self) -> Result<ClusterConfig> {
        self.config
            .get(&0, 0)
            .map_err(Error::ebpf("reading the dispatcher's config"))
    }

    /// Records host `id`: its MAC, state and room. A peer's MAC marks the packets its
    /// dispatcher forwards here.
    pub fn set_host(&mut self, id: u16, host: Host, is_peer: bool) -> Result<()> {
        check_id(id)?;
        if is_peer {
            self.peer_macs
                .insert(mac_key(host.mac), id, 0)
                .map_err(Error::ebpf(format!("recording host {id}'s MAC")))?;
        }
        self.hosts
            .set(id as u32, host, 0)
            .map_err(Error::ebpf(format!("recording host {id}")))
    }

    /// Forgets a MAC the dispatcher took for a peer's (the peer's old one, or a gone
    /// peer's): the map holds one per host, and stale ones would fill it.
    pub fn forget_peer_mac(&mut self, mac: [u8; 6]) {
        // Gone already is as good as removed.
        let _ = self.peer_macs.remove(&mac_key(mac));
    }

    pub fn host(&self, id: u16) -> Result<Host> {
        check_id(id)?;
        self.hosts
            .get(&(id as u32), 0)
            .map_err(Error::ebpf(format!("reading host {id}")))
    }

    /// The client's entry, if this host has one.
    pub fn client(&self, client: [u8; 4]) -> Option<ClientEntry> {
        self.clients.get(&client, 0).ok()
    }

    pub fn set_client(&mut self, client: [u8; 4], entry: ClientEntry) -> Result<()> {
        self.clients
            .insert(client, entry, 0)
            .map_err(Error::ebpf("writing a dispatch table entry"))
    }

    pub fn forget_client(&mut self, client: [u8; 4]) {
        // Gone already (the LRU made room) is as good as removed.
        let _ = self.clients.remove(&client);
    }

    /// Every entry of this host's table.
    pub fn clients(&self) -> Vec<([u8; 4], ClientEntry)> {
        self.clients.iter().flatten().collect()
    }

    pub fn counters(&self) -> Result<DispatchCounters> {
        sum_over_cpus(&self.counters, 0, DispatchCounters::add, names::COUNTERS)
    }

    /// Detaches the dispatcher and removes its pins.
    pub fn remove(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        remove_dir(&dir)
    }
}

/// Removes a dispatcher's pins (which detaches it): what `parsrv cluster stop` does, and a
/// new agent with a different config before loading its own.
pub fn remove_dir(dir: &Path) -> Result<()> {
    match super::pins::remove_dir_detaching(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()))(e)),
    }
}

/// A decision the dispatcher placed, from the ring.
pub fn decision_from(bytes: &[u8]) -> Option<Decision> {
    bytemuck::try_pod_read_unaligned(bytes).ok()
}

fn check_id(id: u16) -> Result<()> {
    if id == 0 || id as u32 > MAX_HOSTS {
        return Err(Error::Rejected(format!(
            "host id {id} is out of range: give 1 to {MAX_HOSTS}"
        )));
    }
    Ok(())
}

fn mac_key(mac: [u8; 6]) -> [u8; 8] {
    let mut key = [0; 8];
    key[..6].copy_from_slice(&mac);
    key
}

fn missing(name: &str) -> Error {
    Error::ebpf("the embedded eBPF object is not parsrv's")(anyhow::anyhow!("it has no {name}"))
}
