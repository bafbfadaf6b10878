//! What the rest of parsrv reads off a [`GroupSpec`] rather than its raw fields: where the
//! slots bind and on which CPU, the user handlers run as, the program's affinity settings and
//! dispatch table, and the durations.

use std::net::SocketAddr;

use super::{dynamic_user, invalid, Affinity, AffinityWhenFull, Credentials, GroupSpec, Listen};
use crate::error::Result;

impl GroupSpec {
    /// The entries as `status` and logs show them: `127.0.0.2:80 127.0.0.3:80`.
    pub fn listen_text(&self) -> String {
        let entries: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        entries.join(" ")
    }

    /// The first pair of entries, one of this group's and one of `other`'s, that a connection
    /// could match both of.
    pub fn overlap_with(&self, other: &GroupSpec) -> Option<(Listen, Listen)> {
        self.listen.iter().find_map(|a| {
            other
                .listen
                .iter()
                .find(|b| a.overlaps(b))
                .map(|b| (*a, *b))
        })
    }

    /// Where the slots' sockets bind, as a pattern that repeats: each entry's bound address,
    /// its COUNT times, in entry order (slot i binds `pattern[i % len]`).
    pub fn slot_pattern(&self) -> Vec<SocketAddr> {
        self.listen
            .iter()
            .flat_map(|l| std::iter::repeat_n(l.bind_addr(), l.count as usize))
            .collect()
    }

    /// Whether the group needs the sk_lookup program: more than one entry, or a prefix or
    /// a port range.
    pub fn needs_lookup(&self) -> bool {
        !matches!(self.listen.as_slice(), [one] if one.is_single())
    }

    /// Whether the group's sockets are UDP (`--listen udp://...`; validation keeps a group to
    /// one transport).
    pub fn is_udp(&self) -> bool {
        self.listen
            .first()
            .is_some_and(|l| l.transport == super::Transport::Udp)
    }

    /// Whether the group grows and shrinks with load (`--handlers MIN..MAX`, MIN < MAX).
    pub fn autoscaled(&self) -> bool {
        self.autoscale && self.handlers.max > self.handlers.min
    }

    /// The CPU handler `slot` is pinned to, if any.
    pub fn cpu_of(&self, slot: u32) -> Option<u32> {
        let cpus = &self.cpus.0;
        (!cpus.is_empty()).then(|| cpus[slot as usize % cpus.len()])
    }

    /// Resolves `--user NAME[:GROUP]` (default group: the user's own), or `dynamic` (see
    /// [`dynamic_user`]).
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        let Some(spec) = &self.user else {
            return Ok(None);
        };
        if spec == dynamic_user::DYNAMIC {
            return Ok(Some(dynamic_user::credentials_of(&self.name)));
        }
        let (user_name, group_name) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec.as_str(), None),
        };
        let user = nix::unistd::User::from_name(user_name)
            .ok()
            .flatten()
            .ok_or_else(|| {
                invalid(
                    "--user",
                    spec,
                    "no such user: create it, or name one from /etc/passwd",
                )
            })?;
        let gid = match group_name {
            None => user.gid.as_raw(),
            Some(g) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| invalid("--user", spec, "no such group: name one from /etc/group"))?
                .gid
                .as_raw(),
        };
        Ok(Some(Credentials {
            uid: user.uid.as_raw(),
            gid,
        }))
    }

    /// The program's affinity settings.
    pub fn affinity_config(&self) -> parsrv_common::reuseport::affinity::AffinityConfig {
        use parsrv_common::reuseport::affinity::{mode, when_full, AffinityConfig};
        let (mask_v4, mask_v6) =
            AffinityConfig::masks(self.affinity_prefix.v4 as u8, self.affinity_prefix.v6 as u8);
        AffinityConfig {
            mode: match self.affinity {
                Affinity::None => mode::NONE,
                Affinity::Client => mode::CLIENT,
            },
            when_full: match self.affinity_when_full {
                AffinityWhenFull::Move => when_full::MOVE,
                AffinityWhenFull::Keep => when_full::KEEP,
            },
            timeout_ns: (self.affinity_timeout * 1e9) as u64,
            mask_v6,
            mask_v4,
            _reserved: 0,
        }
    }

    /// What the group's table (client affinity's dispatch table, or a UDP group's flow
    /// table) takes in kernel memory, for people: `None` without one (a one-entry table).
    pub fn table_memory(&self) -> Option<String> {
        use parsrv_common::{
            reuseport::affinity::{lru_table_bytes, ClientKey, DispatchEntry},
            udp::{FirstFlightKey, FlowEntry, FlowKey},
        };
        let (what, entries, bytes) = if self.affinity == Affinity::Client {
            let bytes = lru_table_bytes(
                self.affinity_table,
                size_of::<ClientKey>(),
                size_of::<DispatchEntry>(),
            );
            ("affinity table", self.affinity_table, bytes)
        } else if self.is_udp() && self.udp_mode == super::UdpMode::Flow {
            let bytes = lru_table_bytes(
                self.flow_table,
                size_of::<FlowKey>(),
                size_of::<FlowEntry>(),
            );
            ("flow table", self.flow_table, bytes)
        } else if self.is_udp() && self.udp_mode == super::UdpMode::Quic {
            let bytes = lru_table_bytes(
                self.flow_table,
                size_of::<FirstFlightKey>(),
                size_of::<FlowEntry>(),
            );
            ("first-flight table", self.flow_table, bytes)
        } else {
            return None;
        };
        Some(format!(
            "{what} of {entries} entries: {:.1} MiB of locked kernel memory, allocated when the \
             group starts",
            bytes as f64 / (1 << 20) as f64
        ))
    }

    /// Entries of the dispatch table the kernel allocates: one when affinity is off (a map
    /// cannot be empty).
    pub fn dispatch_table_size(&self) -> u32 {
        match self.affinity {
            Affinity::None => 1,
            Affinity::Client => self.affinity_table,
        }
    }

    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.grace)
    }

    /// `--stall-after`, or `None` when stall detection is off.
    pub fn stall_after(&self) -> Option<std::time::Duration> {
        (self.stall_after > 0.0).then(|| std::time::Duration::from_secs_f64(self.stall_after))
    }

    pub fn ready_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.ready_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tests::spec, HandlerRange};

    #[test]
    fn a_handler_range_autoscales_unless_told_not_to() {
        let mut s = spec();
        assert!(!s.autoscaled());
        s.handlers = HandlerRange { min: 2, max: 8 };
        s.validate().unwrap();
        assert!(s.autoscaled());
        s.autoscale = false;
        assert!(!s.autoscaled());
    }
}
