//! The sk_lookup program's userspace (eBPF side: `parsrv-ebpf/src/lookup.rs`, shared types:
//! `parsrv_common::lookup`): the group's rules (which addresses and ports it serves, and the
//! entry each belongs to), which entry each slot's socket is bound to, the per-address
//! counters, and the program's link to the network namespace.
//!
//! The program has an object of its own (`address-lookup`), loaded only for a group on
//! several addresses, a prefix or a port range, after the SK_REUSEPORT program's: it takes
//! that program's SOCKETS and CONFIG from their pins ([`load`]), so both programs work on the
//! same two maps. Its own maps and its link are pinned in the group's directory: the link
//! outlives a spawner killed outright, so a group whose handlers live on keeps serving every
//! address, and it goes when the directory is removed (`parsrv stop`, or the next start of
//! the group after everything died). Once the group's sockets are closed, SOCKETS is empty
//! and the program hands nothing over.

use std::path::Path;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, Map, MapData, PerCpuArray,
    },
    programs::{links::FdLink, SkLookup},
    Ebpf,
};
use parsrv_common::lookup::{names, AddressCounters, Rule, RuleKey, V6_ONLY};

use super::{loader, object, sum_over_cpus, EbpfObject, Program};
use crate::{
    error::{Error, Result},
    spec::Listen,
};

/// The program's maps, as the spawner keeps them.
pub struct AddressLookup {
    rules: LpmTrie<MapData, RuleKey, Rule>,
    slot_listen: Array<MapData, u32>,
    counters: PerCpuArray<MapData, AddressCounters>,
}

/// The names of the maps to take from the object and pin.
pub const MAPS: [&str; 3] = [names::RULES, names::SLOT_LISTEN, names::COUNTERS];

impl AddressLookup {
    /// From the maps taken out of the loaded object (in [`MAPS`] order).
    pub fn from_maps([rules, slot_listen, counters]: [Map; 3]) -> Result<Self> {
        let typed = |name: &str| Error::ebpf(format!("map {name} has the wrong type"));
        Ok(AddressLookup {
            rules: rules.try_into().map_err(typed(names::RULES))?,
            slot_listen: slot_listen.try_into().map_err(typed(names::SLOT_LISTEN))?,
            counters: counters.try_into().map_err(typed(names::COUNTERS))?,
        })
    }

    /// From the pins of a running group.
    pub fn adopt(pin_dir: &Path) -> Result<Self> {
        let [rules, slot_listen, counters] = MAPS.map(|name| {
            MapData::from_pin(pin_dir.join(name))
                .map(Map::from_map_data)
                .map_err(Error::ebpf(format!("opening pinned map {name}")))
        });
        let flatten = |m: Result<std::result::Result<Map, aya::maps::MapError>>, name: &str| {
            m?.map_err(Error::ebpf(format!("pinned map {name} (wrong type?)")))
        };
        AddressLookup::from_maps([
            flatten(rules, names::RULES)?,
            flatten(slot_listen, names::SLOT_LISTEN)?,
            flatten(counters, names::COUNTERS)?,
        ])
    }

    /// Writes the group's rules: every (prefix, port) of every entry.
    pub fn set_rules(&mut self, listen: &[Listen]) -> Result<()> {
        for (index, entry) in (0..).zip(listen) {
            let rule = Rule {
                listen: index,
                bound: entry.is_single() as u32,
            };
            for (prefix_len, key) in entry.rules() {
                self.rules
                    .insert(&Key::new(prefix_len, key), rule, 0)
                    .map_err(Error::ebpf(format!("writing the lookup rule of {entry}")))?;
            }
        }
        Ok(())
    }

    /// Records that `slot`'s socket is bound to entry `entry`, and whether it takes only IPv6
    /// (None: the slot has no socket).
    pub fn set_slot(&mut self, slot: u32, entry: Option<(u32, bool)>) -> Result<()> {
        let value = entry.map_or(0, |(entry, v6_only)| {
            (entry + 1) | if v6_only { V6_ONLY } else { 0 }
        });
        self.slot_listen
            .set(slot, value, 0)
            .map_err(Error::ebpf(format!("recording the address of slot {slot}")))
    }

    /// Each entry's counters, summed over CPUs.
    pub fn counters(&self, entries: usize) -> Result<Vec<AddressCounters>> {
        (0..entries as u32)
            .map(|entry| {
                sum_over_cpus(&self.counters, entry, AddressCounters::add, names::COUNTERS)
            })
            .collect()
    }
}

/// Loads the program for a group whose SK_REUSEPORT program's maps are pinned in `pins`, on
/// that program's SOCKETS and CONFIG; pins its own maps there; writes the group's rules
/// (`listen`); attaches it to this process's network namespace and pins the link there.
/// CONFIG must be written already: the program runs from the attach on.
pub fn load(pins: &Path, listen: &[Listen]) -> Result<AddressLookup> {
    use parsrv_common::reuseport::names as group;
    let bytes = object(EbpfObject::AddressLookup)?;
    let shared = [group::SOCKETS, group::CONFIG].map(|name| (name, pins.join(name)));
    let mut ebpf = loader::load_sharing(&bytes, &shared)
        .map_err(Error::ebpf("loading the address-lookup eBPF object"))?;
    let [rules, slot_listen, counters] = MAPS.map(|name| {
        let map = ebpf.take_map(name).ok_or_else(|| {
            Error::ebpf("the embedded address-lookup object is not parsrv's")(anyhow::anyhow!(
                "it has no map {name}"
            ))
        })?;
        map.pin(pins.join(name))
            .map_err(Error::ebpf(format!("pinning map {name}")))?;
        Ok::<_, Error>(map)
    });
    let mut lookup = AddressLookup::from_maps([rules?, slot_listen?, counters?])?;
    lookup.set_rules(listen)?;
    attach(&mut ebpf)?
        .pin(pins.join(names::LINK))
        .map_err(Error::ebpf("pinning the sk_lookup link"))?;
    Ok(lookup)
}

/// Loads the program from `ebpf` (already loaded with its maps) and attaches it to this
/// process's network namespace.
fn attach(ebpf: &mut Ebpf) -> Result<FdLink> {
    let program: &mut SkLookup = ebpf
        .program_mut(names::PROGRAM)
        .ok_or_else(|| {
            Error::ebpf("the embedded address-lookup object is not parsrv's")(anyhow::anyhow!(
                "it has no {}",
                names::PROGRAM
            ))
        })?
        .try_into()
        .map_err(Error::ebpf("the lookup program has the wrong type"))?;
    program
        .load()
        .map_err(|e| super::verification::refusal(Program::AddressLookup, e))?;
    let netns = crate::procfs::own_netns()
        .map_err(Error::io("opening this process's network namespace"))?;
    let link = program.attach(&netns).map_err(Error::ebpf(
        "attaching the sk_lookup program to the network namespace",
    ))?;
    Ok(program
        .take_link(link)
        .map_err(Error::ebpf("taking the sk_lookup link"))?
        .into())
}
