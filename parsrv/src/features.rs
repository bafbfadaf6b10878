//! The kernel features parsrv needs, the Linux version that introduced each, and whether the
//! running kernel has it.
//!
//! Each probe asks the kernel itself, not its version number: BTF enumerators and struct
//! members for what the verifier accepts, /proc/sys for sysctls and capabilities. The
//! version is only used to explain a missing feature (and by the tests, to tell "too old"
//! from "should have it"). `parsrv kernel` prints the table; `parsrv run` refuses to start,
//! naming the first missing feature, before it touches anything.

use std::{fmt, path::Path};

use btf_rs::Type;
use serde::Serialize;

use crate::{
    dataplane::Program,
    error::{Error, Result},
    kernel::{find_member, vmlinux_btf_path, KernelBtf},
    procfs,
};

/// A kernel feature the steering program depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    /// /sys/kernel/btf/vmlinux: where the program's struct offsets come from.
    Btf,
    /// BPF_PROG_TYPE_SK_REUSEPORT.
    SkReuseport,
    /// CAP_BPF and CAP_PERFMON exist (before, only CAP_SYS_ADMIN allowed probe reads).
    CapBpf,
    /// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: the program also places migrating requests.
    SelectOrMigrate,
    /// `ctx->sk` (the listener the kernel's hash chose) in SK_REUSEPORT programs.
    ReuseportCtxSk,
    /// The bpf_loop helper, which bounds the verifier's work for the scan of all sockets.
    BpfLoop,
    /// net.ipv4.tcp_migrate_req: queued connections move off a closing listener.
    TcpMigrateReq,
    /// BPF_PROG_TYPE_SK_LOOKUP: a group on several addresses, a prefix or a port range.
    SkLookup,
    /// tcx links (BPF_TCX_INGRESS): the cluster's host dispatcher, attached as a link that
    /// can be pinned and so outlives its agent.
    Tcx,
    /// The TCP socket iterator (`iter/tcp`): the watchdog reads which program each reuseport
    /// group runs.
    TcpIter,
}

impl Feature {
    /// Every feature, in the order a missing one is reported (BTF first: the others are
    /// probed through it).
    pub const ALL: [Feature; 10] = [
        Feature::Btf,
        Feature::SkReuseport,
        Feature::CapBpf,
        Feature::SelectOrMigrate,
        Feature::ReuseportCtxSk,
        Feature::TcpMigrateReq,
        Feature::BpfLoop,
        Feature::SkLookup,
        Feature::Tcx,
        Feature::TcpIter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Btf => "kernel BTF (CONFIG_DEBUG_INFO_BTF)",
            Feature::SkReuseport => "SK_REUSEPORT programs",
            Feature::CapBpf => "CAP_BPF and CAP_PERFMON",
            Feature::SelectOrMigrate => "SK_REUSEPORT_SELECT_OR_MIGRATE",
            Feature::ReuseportCtxSk => "ctx->sk in SK_REUSEPORT programs",
            Feature::TcpMigrateReq => "net.ipv4.tcp_migrate_req",
            Feature::BpfLoop => "the bpf_loop helper",
            Feature::SkLookup => "SK_LOOKUP programs",
            Feature::Tcx => "tcx links (BPF_TCX_INGRESS)",
            Feature::TcpIter => "the TCP socket iterator (iter/tcp)",
        }
    }

    /// The Linux release that introduced the feature.
    pub fn since(self) -> KernelVersion {
        let (major, minor) = match self {
            Feature::Btf => (5, 4),
            Feature::SkReuseport => (4, 19),
            Feature::CapBpf => (5, 8),
            Feature::SelectOrMigrate | Feature::ReuseportCtxSk | Feature::TcpMigrateReq => (5, 14),
            Feature::BpfLoop => (5, 17),
            Feature::SkLookup => (5, 9),
            Feature::Tcx => (6, 6),
            Feature::TcpIter => (5, 9),
        };
        KernelVersion { major, minor }
    }

    /// What parsrv uses it for.
    pub fn used_for(self) -> &'static str {
        match self {
            Feature::Btf => "offsets of the queue fields the program reads",
            Feature::SkReuseport => "the steering program itself",
            Feature::CapBpf => "loading with probe reads without CAP_SYS_ADMIN's blanket",
            Feature::SelectOrMigrate => "placing requests that migrate off a closing socket",
            Feature::ReuseportCtxSk => "the group and hash choice of each connection",
            Feature::TcpMigrateReq => "no queued connection lost when a handler goes",
            Feature::BpfLoop => "scanning up to 128 sockets within the verifier's limit",
            Feature::SkLookup => "one group on several addresses, prefixes and port ranges",
            Feature::Tcx => "the host dispatcher of a cluster (parsrv cluster run)",
            Feature::TcpIter => "checking that each group still runs its program (the watchdog)",
        }
    }
}

/// The oldest Linux release with every feature groups need (`parsrv run`).
pub fn minimum_kernel() -> KernelVersion {
    needed_by(&Program::GROUPS)
        .iter()
        .map(|f| f.since())
        .max()
        .unwrap()
}

/// What `programs` need together, in [`Feature::ALL`]'s order.
pub fn needed_by(programs: &[Program]) -> Vec<Feature> {
    Feature::ALL
        .into_iter()
        .filter(|f| programs.iter().any(|p| p.requires().contains(f)))
        .collect()
}

/// A Linux release, major.minor (serialized as "5.14").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    /// Parses the start of a release string such as `6.1.0-56-amd64` or `5.10.223`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.split(['.', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor_digits: String = parts
            .next()?
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        Some(KernelVersion {
            major,
            minor: minor_digits.parse().ok()?,
        })
    }
}

impl Serialize for KernelVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// What the running kernel has.
#[derive(Clone, Debug, Serialize)]
pub struct KernelFeatures {
    pub release: String,
    pub version: Option<KernelVersion>,
    pub features: Vec<FeatureProbe>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FeatureProbe {
    pub feature: Feature,
    pub name: &'static str,
    pub since: KernelVersion,
    pub present: bool,
    /// Needed to run groups (`parsrv run`); the others serve one command only (the
    /// cluster dispatcher).
    pub required: bool,
}

impl KernelFeatures {
    /// Probes every feature of the running kernel.
    pub fn probe() -> Self {
        Self::probe_with(crate::kernel::vmlinux_btf().ok().as_ref())
    }

    /// Probes every feature, with the running kernel's BTF already parsed (None: it has
    /// none).
    pub fn probe_with(btf: Option<&KernelBtf>) -> Self {
        let proc_sys = procfs::sysctls();
        let features = Feature::ALL
            .iter()
            .map(|&feature| FeatureProbe {
                feature,
                name: feature.name(),
                since: feature.since(),
                present: probe(feature, btf, proc_sys),
                required: needed_by(&Program::GROUPS).contains(&feature),
            })
            .collect();
        let release = kernel_release();
        KernelFeatures {
            version: KernelVersion::parse(&release),
            release,
            features,
        }
    }

    pub fn has(&self, feature: Feature) -> bool {
        self.features
            .iter()
            .any(|p| p.feature == feature && p.present)
    }

    pub fn missing(&self) -> impl Iterator<Item = Feature> + '_ {
        self.features
            .iter()
            .filter(|p| !p.present)
            .map(|p| p.feature)
    }

    /// Fails, naming the first missing feature and the fix, unless the kernel has every
    /// feature that `programs` need.
    pub fn require_for(&self, programs: &[Program]) -> Result<()> {
        let needed = needed_by(programs);
        let minimum = needed.iter().map(|f| f.since()).max();
        match self.missing().find(|f| needed.contains(f)) {
            None => Ok(()),
            Some(Feature::Btf) => Err(Error::NoBtf {
                path: vmlinux_btf_path(),
            }),
            Some(feature) => Err(Error::KernelFeature {
                release: self.release.clone(),
                feature: feature.name(),
                since: feature.since().to_string(),
                minimum: minimum.unwrap_or(feature.since()).to_string(),
            }),
        }
    }

    /// Fails unless the kernel has what groups need (every program but the cluster's
    /// dispatcher, which `parsrv cluster run` checks).
    pub fn require_all(&self) -> Result<()> {
        self.require_for(&Program::GROUPS)
    }
}

/// Whether the kernel has `feature`. Features the kernel describes in its BTF are absent
/// when there is no BTF to ask: parsrv cannot run without it anyway.
fn probe(feature: Feature, btf: Option<&KernelBtf>, proc_sys: &Path) -> bool {
    let has_enumerator = |enumeration: &str, name: &str| {
        btf.is_some_and(|btf| enumerators(btf, enumeration).iter().any(|n| n == name))
    };
    match feature {
        Feature::Btf => btf.is_some(),
        Feature::SkReuseport => has_enumerator("bpf_prog_type", "BPF_PROG_TYPE_SK_REUSEPORT"),
        Feature::SelectOrMigrate => {
            has_enumerator("bpf_attach_type", "BPF_SK_REUSEPORT_SELECT_OR_MIGRATE")
        }
        Feature::BpfLoop => has_enumerator("bpf_func_id", "BPF_FUNC_loop"),
        Feature::SkLookup => has_enumerator("bpf_prog_type", "BPF_PROG_TYPE_SK_LOOKUP"),
        Feature::Tcx => has_enumerator("bpf_attach_type", "BPF_TCX_INGRESS"),
        // The iterator's target: the kernel function its attach BTF id names.
        Feature::TcpIter => btf.is_some_and(|btf| {
            btf.types_named("bpf_iter_tcp")
                .iter()
                .any(|t| matches!(t, Type::Func(_)))
        }),
        // The program context (uapi sk_reuseport_md) gained `sk` in 5.14. Kernels whose BTF
        // lacks the uapi struct tell by the kernel-side context's `migrating_sk`, which came
        // in the same series (its own `sk` is older: it is not a sign).
        Feature::ReuseportCtxSk => btf.is_some_and(|btf| {
            struct_has(btf, "sk_reuseport_md", "sk").unwrap_or_else(|| {
                struct_has(btf, "sk_reuseport_kern", "migrating_sk").unwrap_or(false)
            })
        }),
        Feature::CapBpf => {
            procfs::last_capability_in(proc_sys).is_ok_and(|last| last >= crate::kernel::CAP_BPF)
        }
        Feature::TcpMigrateReq => procfs::has_sysctl_in(proc_sys, "net/ipv4/tcp_migrate_req"),
    }
}

fn enumerators(btf: &KernelBtf, enumeration: &str) -> Vec<String> {
    let mut names = Vec::new();
    for ty in btf.types_named(enumeration) {
        match ty {
            Type::Enum(e) => {
                names.extend(e.members.iter().filter_map(|m| btf.resolve_name(m).ok()))
            }
            Type::Enum64(e) => {
                names.extend(e.members.iter().filter_map(|m| btf.resolve_name(m).ok()))
            }
            _ => {}
        }
    }
    names
}

/// Whether struct `structure` has `member` (looking into anonymous unions, which is where
/// uapi context pointers live); None if the BTF has no such struct.
fn struct_has(btf: &KernelBtf, structure: &str, member: &str) -> Option<bool> {
    let ty = btf
        .types_named(structure)
        .into_iter()
        .find(|ty| matches!(ty, Type::Struct(_)))?;
    Some(find_member(btf, &ty, member).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn releases_parse_to_major_minor() {
        let v = |major, minor| Some(KernelVersion { major, minor });
        assert_eq!(KernelVersion::parse("6.1.0-56-amd64"), v(6, 1));
        assert_eq!(KernelVersion::parse("6.12.95+deb12-amd64"), v(6, 12));
        assert_eq!(KernelVersion::parse("5.10.223"), v(5, 10));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v657"), v(6, 18));
        assert_eq!(KernelVersion::parse("6.0-rc1"), v(6, 0));
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion::parse("5.9.0").unwrap() < KernelVersion::parse("5.10.0").unwrap());
    }

    #[test]
    fn the_minimum_kernel_is_the_newest_feature() {
        assert_eq!(minimum_kernel().to_string(), "5.17");
    }

    #[test]
    fn each_program_requires_only_its_own_features() {
        // Every feature is needed by some program (none is probed for nothing).
        assert_eq!(needed_by(&Program::ALL), Feature::ALL);
        let kernel = |missing: &[Feature]| KernelFeatures {
            release: "test".into(),
            version: None,
            features: Feature::ALL
                .into_iter()
                .map(|feature| FeatureProbe {
                    feature,
                    name: feature.name(),
                    since: feature.since(),
                    present: !missing.contains(&feature),
                    required: true,
                })
                .collect(),
        };
        // A kernel that lacks a feature fails only for the programs that need it, naming it.
        let without_loop = kernel(&[Feature::BpfLoop]);
        without_loop.require_for(&[]).unwrap();
        let err = without_loop.require_for(&Program::ALL).unwrap_err();
        assert!(err.to_string().contains(Feature::BpfLoop.name()), "{err}");
        // A kernel without sk_lookup runs groups on one address, and refuses the others.
        let without_lookup = kernel(&[Feature::SkLookup]);
        without_lookup
            .require_for(&[Program::ReuseportSelect])
            .unwrap();
        let err = without_lookup
            .require_for(&[Program::ReuseportSelect, Program::AddressLookup])
            .unwrap_err();
        assert!(err.to_string().contains("SK_LOOKUP programs"), "{err}");
        kernel(&[]).require_all().unwrap();
        // BTF first: without it the others cannot be probed.
        let err = kernel(&[Feature::BpfLoop, Feature::Btf])
            .require_all()
            .unwrap_err();
        assert!(matches!(err, Error::NoBtf { .. }), "{err}");
        // A kernel without tcx runs groups, and refuses the cluster's dispatcher.
        let without_tcx = kernel(&[Feature::Tcx]);
        without_tcx.require_all().unwrap();
        let err = without_tcx
            .require_for(&[Program::ClusterDispatch])
            .unwrap_err();
        assert!(err.to_string().contains("tcx"), "{err}");
    }

    #[test]
    fn proc_sys_probes_read_what_they_name() {
        let dir = std::env::temp_dir().join(format!("parsrv-features-{}", std::process::id()));
        fs::create_dir_all(dir.join("kernel")).unwrap();
        fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        fs::write(dir.join("kernel/cap_last_cap"), "37\n").unwrap();
        assert!(!probe(Feature::CapBpf, None, &dir));
        assert!(!probe(Feature::TcpMigrateReq, None, &dir));
        fs::write(dir.join("kernel/cap_last_cap"), "40\n").unwrap();
        fs::write(dir.join("net/ipv4/tcp_migrate_req"), "0\n").unwrap();
        assert!(probe(Feature::CapBpf, None, &dir));
        assert!(probe(Feature::TcpMigrateReq, None, &dir));
        // Without BTF, what only BTF can tell is absent.
        assert!(!probe(Feature::BpfLoop, None, &dir));
        fs::remove_dir_all(&dir).unwrap();
    }
}
