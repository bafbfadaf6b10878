//! What a test starts from: the state of a machine that has just booted, its own and no
//! other's. The suite as a whole starts without bpffs and with an empty /run (as `cargo
//! xtask test` and the VMs run it); each test gets its own network namespace, bpffs instance
//! and run directory; parsrv mounts bpffs where it is missing and uses the one that is
//! mounted.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use parsrv::{control, dataplane::pins::group_dir as pin_dir};
use parsrv_integration_tests::{
    addr, bpffs_mounted, group, http_get, isolated, kernel_has, mount_bpffs, privileged, skip,
    unmount_bpffs, wait_for, HandlerKind, Needs, Outcome, BPFFS, FRESH_MACHINE_ENV,
};

/// The run directory parsrv uses by default (tests never set `PARSRV_RUN_DIR`).
fn run_dir() -> &'static Path {
    Path::new(parsrv::run_dir::RUN_DIR)
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn the_suite_starts_as_on_a_freshly_booted_machine() {
    if std::env::var_os(FRESH_MACHINE_ENV).is_none() {
        skip("not started by `cargo xtask test` or the VMs' init, which set up that state");
        return;
    }
    // This thread is in the namespace the suite started in, not a test's own.
    assert!(
        !bpffs_mounted(),
        "bpffs is mounted at {BPFFS} where the suite started"
    );
    assert!(!run_dir().exists(), "{} exists", run_dir().display());
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn each_test_has_a_bpffs_and_run_directory_of_its_own_and_leaves_nothing() {
    // Not inside `privileged`: this test looks at the suite's namespace, and makes two
    // isolated tests of its own.
    if !kernel_has(parsrv::dataplane::Program::ReuseportSelect.requires()) {
        return;
    }
    // The suite's own view, through the main thread's root (/proc/self is the process).
    let suite_bpffs = Path::new("/proc/self/root").join(BPFFS.trim_start_matches('/'));
    let suite_device = std::fs::metadata(&suite_bpffs).unwrap().dev();

    // Two tests at once, with the same group name and address: each runs, in its own
    // network namespace, bpffs instance and run directory.
    let (started, checked) = (Rendezvous::new(), Rendezvous::new());
    let twins: Vec<_> = (0..2)
        .map(|_| {
            let (started, checked) = (started.clone(), checked.clone());
            thread::spawn(move || {
                isolated(move || {
                    assert!(bpffs_mounted());
                    assert_ne!(std::fs::metadata(BPFFS).unwrap().dev(), suite_device);
                    let entries = bpffs_entries();
                    assert!(
                        entries.is_empty() || entries == PRELOADED,
                        "not a fresh bpffs: {entries:?}"
                    );
                    assert!(!run_dir().exists(), "{} exists", run_dir().display());

                    let spawner = group("twin", HandlerKind::Http).start();
                    started.meet();
                    assert!(pin_dir("twin").exists());
                    assert!(control::socket_path("twin").exists());
                    let pid = spawner.status().spawner_pid;
                    assert_eq!(pid, spawner.pid(), "another test's spawner answered");
                    assert_eq!(http_get(addr(), TIMEOUT), Outcome::Ok);
                    // Both still running here: neither saw the other's pins or socket.
                    checked.meet();
                    assert!(spawner.stop().success());
                    pid
                })
            })
        })
        .collect();
    let pids: Vec<u32> = twins.into_iter().map(|t| t.join().unwrap()).collect();
    assert_ne!(pids[0], pids[1]);
    // Nothing of theirs in the suite's namespace.
    assert!(!suite_bpffs.join("parsrv").exists());
    assert!(!Path::new("/proc/self/root/run/parsrv/twin.sock").exists());
}

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Where the two threads of a test wait for each other, for 30 s at most (a barrier would
/// hang the suite if the other thread failed first).
#[derive(Clone)]
struct Rendezvous(Arc<AtomicUsize>);

impl Rendezvous {
    fn new() -> Rendezvous {
        Rendezvous(Arc::new(AtomicUsize::new(0)))
    }

    fn meet(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        let both = wait_for(std::time::Duration::from_secs(30), || {
            self.0.load(Ordering::SeqCst) >= 2
        });
        assert!(both, "the other thread never got here");
    }
}

/// What every new bpffs instance holds where the kernel has CONFIG_BPF_PRELOAD (the
/// iterators `bpf_preload` adds to each mount); nothing where it has not.
const PRELOADED: &[&str] = &["maps.debug", "progs.debug"];

/// The names at /sys/fs/bpf, sorted.
fn bpffs_entries() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(BPFFS)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn parsrv_mounts_bpffs_where_missing_and_uses_the_one_mounted() {
    privileged(Needs::program(), || {
        // Missing, as on a machine that has just booted: parsrv mounts it and says so once.
        unmount_bpffs();
        assert!(!bpffs_mounted());
        let spawner = group("bpffs-missing", HandlerKind::Http).start();
        let mounted = format!(
            "{}INFO: mounted bpffs at {BPFFS}",
            parsrv::output::log_prefix(spawner.pid())
        );
        let log = spawner.log();
        assert_eq!(log.lines().filter(|l| *l == mounted).count(), 1, "{log}");
        assert!(bpffs_mounted());
        assert!(pin_dir("bpffs-missing").exists());
        // Root's alone, as systemd mounts it (a bpffs mounted without a mode is 1777).
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let root = std::fs::metadata(BPFFS).unwrap();
            assert_eq!((root.uid(), root.permissions().mode() & 0o777), (0, 0o700));
        }
        assert!(spawner.stop().success());
        assert!(!pin_dir("bpffs-missing").exists());
        // It stays mounted, as systemd would have it: others may use it.
        assert!(bpffs_mounted());

        // Mounted already (a fresh instance with a mark of this test's): used as it is.
        unmount_bpffs();
        mount_bpffs().unwrap();
        let mark = Path::new(BPFFS).join("mark");
        std::fs::create_dir(&mark).unwrap();
        let spawner = group("bpffs-there", HandlerKind::Http).start();
        assert!(
            !spawner.log().contains("mounted bpffs"),
            "{}",
            spawner.log()
        );
        assert!(mark.exists() && pin_dir("bpffs-there").exists());
        assert!(spawner.stop().success());
        assert!(!pin_dir("bpffs-there").exists());
    });
}
