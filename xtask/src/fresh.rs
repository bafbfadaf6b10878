//! The native privileged suite runs as it would on a machine that has just booted, whatever
//! this host keeps: a run here that passes must pass for a new user.
//!
//! A machine that has once run parsrv (or anything else using eBPF) keeps bpffs mounted at
//! /sys/fs/bpf, and maybe control sockets under /run/parsrv; a fresh one has neither. So the
//! suite runs in a mount namespace of its own in which every bpffs at /sys/fs/bpf is
//! detached and /run is an empty tmpfs. Nothing of it reaches the host (propagation is
//! private), and it ends with the suite.

use std::{os::unix::process::CommandExt as _, process::Command};

/// Tells the tests that they started in a fresh machine's state, so that they check it
/// (the integration tests' `FRESH_MACHINE_ENV`; the VM's init sets it too).
pub const FRESH_MACHINE_ENV: &str = "PARSRV_TEST_FRESH_MACHINE";

const BPFFS: &str = "/sys/fs/bpf";

/// Makes `command` start in a fresh machine's state (needs root).
pub fn as_on_a_fresh_machine(command: &mut Command) -> &mut Command {
    command.env(FRESH_MACHINE_ENV, "1");
    // SAFETY: between fork and exec this makes only system calls (unshare, mount, umount2)
    // and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            use nix::{
                mount::{mount, umount2, MntFlags, MsFlags},
                sched::{unshare, CloneFlags},
            };
            unshare(CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            // bpffs can be mounted more than once on the same path.
            while umount2(BPFFS, MntFlags::MNT_DETACH).is_ok() {}
            mount(
                Some("tmpfs"),
                "/run",
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, MsFlags};

    const SHOW_STATE: &str =
        "stat -f -c %T /sys/fs/bpf; ls -A /run; echo fresh=$PARSRV_TEST_FRESH_MACHINE";

    /// Root only: the unit tests also run unprivileged, where this has nothing to show.
    #[test]
    fn a_fresh_machine_has_no_bpffs_and_an_empty_run_whatever_the_host_has() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A "host" that has run parsrv before, in a mount namespace of this thread's own.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
            mount(None::<&str>, "/", None::<&str>, private, None::<&str>).unwrap();
            for _ in 0..2 {
                mount(
                    Some("bpf"),
                    BPFFS,
                    Some("bpf"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .unwrap();
            }
            let run = MsFlags::empty();
            mount(Some("tmpfs"), "/run", Some("tmpfs"), run, None::<&str>).unwrap();
            std::fs::create_dir("/run/parsrv").unwrap();
            std::fs::write("/run/parsrv/stale.sock", "").unwrap();

            let shell = |fresh: bool| {
                let mut sh = Command::new("sh");
                sh.args(["-c", SHOW_STATE]).env_remove(FRESH_MACHINE_ENV);
                if fresh {
                    as_on_a_fresh_machine(&mut sh);
                }
                let output = sh.output().expect("running sh");
                assert!(output.status.success(), "{output:?}");
                String::from_utf8_lossy(&output.stdout).into_owned()
            };
            // The control: a plain child sees the host's state.
            assert_eq!(shell(false), "bpf_fs\nparsrv\nfresh=\n");
            // sysfs: the directory is there, with no bpffs on it; /run is empty.
            assert_eq!(shell(true), "sysfs\nfresh=1\n");
        })
        .join()
        .unwrap();
    }
}
