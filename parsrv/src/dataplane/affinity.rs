//! Client affinity's userspace (eBPF side: `parsrv-ebpf/src/affinity.rs`, shared types:
//! `parsrv_common::reuseport::affinity`): reading the dispatch table and the dispatchers'
//! counters. The SK_REUSEPORT program owns both maps and loads them ([`super::reuseport`]);
//! userspace never writes an entry: the kernel's dispatchers place, move and forget them.

use std::net::{IpAddr, Ipv6Addr};

use aya::maps::{HashMap, MapData, PerCpuArray};
use parsrv_common::reuseport::{
    affinity::{AffinityCounters, ClientKey, DispatchEntry, V4_MAPPED_PREFIX},
    names,
};
use serde::{Deserialize, Serialize};

use super::monotonic_ns;
use crate::error::{Error, Result};

/// The dispatch table and its counters.
pub struct DispatchTable {
    pub(super) entries: HashMap<MapData, ClientKey, DispatchEntry>,
    pub(super) counters: PerCpuArray<MapData, AffinityCounters>,
    /// Entries the kernel allocated.
    pub(super) capacity: u32,
}

/// One client's entry as people read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// The client: its address cut to the group's prefix.
    pub client: IpAddr,
    pub slot: u32,
    /// The socket's cookie, as in `status`.
    pub cookie: u64,
    /// Since the entry was placed or last moved, and since a connection last used it, ms.
    pub age_ms: u64,
    pub idle_ms: u64,
}

impl DispatchTable {
    /// The dispatchers' counters, summed over CPUs.
    pub fn counters(&self) -> Result<AffinityCounters> {
        super::sum_over_cpus(
            &self.counters,
            0,
            AffinityCounters::add,
            names::AFFINITY_COUNTERS,
        )
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Every entry that has not expired (one idle longer than `timeout_ns` is re-decided at
    /// the client's next connection, and the LRU reclaims it when space is short), oldest
    /// decision first.
    pub fn entries(&self, timeout_ns: u64) -> Result<Vec<ClientEntry>> {
        let now = monotonic_ns();
        let mut entries = Vec::new();
        for item in self.entries.iter() {
            let (key, entry) = match item {
                Ok(item) => item,
                // Forgotten between listing its key and reading it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(Error::ebpf("reading DISPATCH_TABLE")(e)),
            };
            let idle = entry.idle_ns(now);
            if idle > timeout_ns {
                continue;
            }
            entries.push(ClientEntry {
                client: client_addr(&key),
                slot: entry.slot,
                cookie: entry.cookie,
                age_ms: now.saturating_sub(entry.decided_ns) / 1_000_000,
                idle_ms: idle / 1_000_000,
            });
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.age_ms));
        Ok(entries)
    }
}

/// A key's address: IPv4 for a mapped one.
pub fn client_addr(key: &ClientKey) -> IpAddr {
    let bytes: [u8; 16] = bytemuck::cast(key.addr);
    let v6 = Ipv6Addr::from(bytes);
    if key.addr[..3] == V4_MAPPED_PREFIX {
        IpAddr::V4(v6.to_ipv4_mapped().expect("a mapped prefix"))
    } else {
        IpAddr::V6(v6)
    }
}

/// The key of `client` under these masks, as the program builds it.
pub fn client_key(client: IpAddr, mask_v4: u32, mask_v6: [u32; 4]) -> ClientKey {
    let v6 = match client {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6, |v4| v4.to_ipv6_mapped()),
    };
    let mut addr: [u32; 4] = bytemuck::cast(v6.octets());
    if addr[..3] == V4_MAPPED_PREFIX {
        addr[3] &= mask_v4;
    } else {
        for (word, mask) in addr.iter_mut().zip(mask_v6) {
            *word &= mask;
        }
    }
    ClientKey { addr }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parsrv_common::reuseport::affinity::AffinityConfig;

    #[test]
    fn keys_round_trip_and_cut_to_the_prefix() {
        let (v4, v6) = AffinityConfig::masks(24, 64);
        let key = client_key("127.1.2.3".parse().unwrap(), v4, v6);
        assert_eq!(client_addr(&key), "127.1.2.0".parse::<IpAddr>().unwrap());
        let key = client_key("2001:db8:1:2:3:4:5:6".parse().unwrap(), v4, v6);
        assert_eq!(
            client_addr(&key),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        // An IPv4 client through an IPv6 socket is the IPv4 client.
        let mapped = client_key("::ffff:127.1.2.3".parse().unwrap(), v4, v6);
        assert_eq!(mapped, client_key("127.1.2.3".parse().unwrap(), v4, v6));
    }
}
