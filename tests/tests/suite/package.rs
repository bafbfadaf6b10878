//! The Debian package as an operator meets it, in a clean Debian 12 root (an overlay over a
//! debootstrapped one, so every run starts clean and leaves it so): apt installs it, the
//! binary, man page, completions and unit work, a running group is upgraded to the next
//! package under open-loop load losing nothing, and apt removes it leaving no pin, link or
//! run-directory entry. Run by `cargo xtask package --test`, which builds both packages and
//! the root; not part of `cargo xtask test` (see docs/operations.md, "Packages").

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::Duration,
};

use parsrv_integration_tests::{
    addr, parsrv_lookup_links, privileged, wait_for, Needs, OpenLoad, Outcome,
};

/// What `cargo xtask package --test` hands the test.
struct Inputs {
    deb: PathBuf,
    next_deb: PathBuf,
    debian_root: PathBuf,
}

fn inputs() -> Inputs {
    let path = |name: &str| {
        PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
            panic!("{name} is not set: this test is run by `cargo xtask package --test`")
        }))
    };
    Inputs {
        deb: path("PARSRV_DEB"),
        next_deb: path("PARSRV_DEB_NEXT"),
        debian_root: path("PARSRV_DEBIAN_ROOT"),
    }
}

/// Runs `args` in `root` (chroot), with a plain environment; its stdout, or a panic with
/// everything it said.
fn inside(root: &Path, args: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LANG", "C.UTF-8")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} in {}: {}\n{}{}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mount(args: &[&str]) {
    let out = Command::new("mount").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A clean copy of the Debian root to write into (this test's mount namespace only), with
/// /proc, /sys (this test's bpffs under it), /dev and an empty /run.
fn clean_root(debian: &Path, scratch: &Path) -> PathBuf {
    let [upper, work, root] = ["upper", "work", "root"].map(|d| scratch.join(d));
    for dir in [&upper, &work, &root] {
        std::fs::create_dir_all(dir).unwrap();
    }
    mount(&[
        "-t",
        "overlay",
        "overlay",
        "-o",
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            debian.display(),
            upper.display(),
            work.display()
        ),
        root.to_str().unwrap(),
    ]);
    let at = |dir: &str| root.join(dir).to_str().unwrap().to_owned();
    mount(&["-t", "proc", "proc", &at("proc")]);
    mount(&["--rbind", "/sys", &at("sys")]);
    mount(&["--rbind", "/dev", &at("dev")]);
    mount(&["-t", "tmpfs", "tmpfs", &at("run")]);
    root
}

/// The spawner started in the root: stopped (SIGTERM: it stops its handlers) when the test
/// ends, pass or fail, unless it is gone already.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if !wait_for(Duration::from_secs(30), || {
                self.0.try_wait().ok().flatten().is_some()
            }) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

fn pids_of_handlers(status: &serde_json::Value) -> Vec<u64> {
    status["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["pid"].as_u64().expect("a live handler"))
        .collect()
}

#[test]
#[ignore = "privileged, and needs the packages: run with `cargo xtask package --test`"]
fn the_package_installs_upgrades_a_running_group_under_load_and_removes_cleanly() {
    let inputs = inputs();
    let needs = Needs::program().host_only("installs a package into a Debian root");
    privileged(needs, move || {
        let scratch = std::env::temp_dir().join(format!("parsrv-package-{}", std::process::id()));
        let root = clean_root(&inputs.debian_root, &scratch);
        for (deb, name) in [
            (&inputs.deb, "parsrv.deb"),
            (&inputs.next_deb, "parsrv-next.deb"),
        ] {
            std::fs::copy(deb, root.join("tmp").join(name)).unwrap();
        }

        // Installed by apt as an operator would, then each installed piece works.
        inside(&root, &["apt-get", "install", "-y", "/tmp/parsrv.deb"]);
        let version = inside(&root, &["parsrv", "--version"]);
        assert!(version.starts_with("parsrv "), "{version}");
        let page = inside(&root, &["man", "--pager=cat", "parsrv-run"]);
        assert!(page.contains("--listen"), "{page}");
        let completion = inside(
            &root,
            &[
                "bash",
                "-c",
                "source /usr/share/bash-completion/completions/parsrv && complete -p parsrv",
            ],
        );
        assert!(completion.contains("_parsrv"), "{completion}");
        let verified = inside(
            &root,
            &[
                "systemd-analyze",
                "verify",
                "/usr/lib/systemd/system/parsrv.service",
            ],
        );
        assert!(!verified.contains("parsrv.service:"), "{verified}");
        inside(
            &root,
            &["parsrv", "check", "--config", "/etc/parsrv/parsrv.toml"],
        );

        // The shipped config's group, run as the unit runs it (no systemd in a chroot: the
        // same command line).
        let mut spawner = Running(
            Command::new("chroot")
                .arg(&root)
                .args([
                    "/usr/sbin/parsrv",
                    "run",
                    "--config",
                    "/etc/parsrv/parsrv.toml",
                ])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(scratch.join("spawner.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let status = || -> Option<serde_json::Value> {
            let out = Command::new("chroot")
                .arg(&root)
                .args(["parsrv", "status", "example", "--json"])
                .output()
                .ok()?;
            serde_json::from_slice(&out.stdout).ok()
        };
        let log = || std::fs::read_to_string(scratch.join("spawner.log")).unwrap_or_default();
        assert!(
            wait_for(Duration::from_secs(30), || status().is_some_and(|s| {
                s["handlers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| h["ready"] == true)
            })),
            "{}",
            log()
        );
        let before = status().unwrap();

        // The next package installed under open-loop load: its postinst upgrades the
        // running spawner in place.
        // The shipped config's group listens where the tests' groups do (127.0.0.1:8080).
        let load = OpenLoad::start(addr(), 200, Duration::from_secs(6), Duration::from_secs(3));
        sleep(Duration::from_secs(1));
        inside(&root, &["apt-get", "install", "-y", "/tmp/parsrv-next.deb"]);
        sleep(Duration::from_secs(1));
        let outcomes = load.finish();
        let failed = outcomes.iter().filter(|o| **o != Outcome::Ok).count();
        eprintln!(
            "upgraded to the next package under load: {} requests at 200/s, {failed} failed",
            outcomes.len()
        );
        assert_eq!(
            failed,
            0,
            "{failed} of {} failed:\n{}",
            outcomes.len(),
            log()
        );
        assert!(outcomes.len() >= 1000, "{}", outcomes.len());
        let after = status().unwrap();
        assert_eq!(after["spawner_pid"], before["spawner_pid"], "{}", log());
        assert_ne!(
            after["spawner_started_ms"],
            before["spawner_started_ms"],
            "not upgraded:\n{}",
            log()
        );
        assert_eq!(pids_of_handlers(&after), pids_of_handlers(&before));
        // The kernel's word: the spawner runs the file the new package installed.
        let running = std::fs::metadata(format!("/proc/{}/exe", spawner.0.id())).unwrap();
        let installed = std::fs::metadata(root.join("usr/sbin/parsrv")).unwrap();
        assert_eq!(
            (running.dev(), running.ino()),
            (installed.dev(), installed.ino())
        );

        // Removed by apt: the service stops and leaves nothing.
        inside(&root, &["apt-get", "remove", "-y", "parsrv"]);
        assert!(
            wait_for(Duration::from_secs(30), || spawner
                .0
                .try_wait()
                .unwrap()
                .is_some()),
            "the spawner outlived the package:\n{}",
            log()
        );
        let bpffs = Path::new(parsrv::kernel::BPFFS).join("parsrv");
        let pins: Vec<_> = std::fs::read_dir(&bpffs)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(pins, Vec::<std::ffi::OsString>::new(), "pins left");
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new(), "links left");
        let run_dir: Vec<_> = std::fs::read_dir(root.join("run/parsrv"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(run_dir, Vec::<PathBuf>::new(), "run-directory entries left");
        assert!(!root.join("usr/sbin/parsrv").exists());
        assert!(
            root.join("etc/parsrv/parsrv.toml").exists(),
            "remove keeps the config"
        );
        inside(&root, &["apt-get", "purge", "-y", "parsrv"]);
        assert!(
            !root.join("etc/parsrv").exists(),
            "purge removes the config"
        );
    });
}
