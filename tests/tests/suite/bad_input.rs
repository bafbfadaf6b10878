//! Bad input: one line naming the cause and the fix, exit code 2 for usage errors and 1 for
//! runtime errors, and nothing left behind: no pins, no control socket, no process, no
//! loaded program, nothing listening.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use parsrv::{control, dataplane::pins::group_dir as pin_dir, features::KernelVersion};
use parsrv_integration_tests::{
    addr, bpffs_mounted, connect, drop_capability, error_line, group, loaded_parsrv_programs,
    mount_bpffs, parsrv_lookup_links, privileged, processes_mentioning, run_parsrv, signal,
    unmount_bpffs, Feature, HandlerKind, Needs, Outcome,
};

const NAME: &str = "test-bad-input";

fn run_group(extra: &[&str]) -> Vec<String> {
    let mut args = vec!["run", "--name", NAME];
    if !extra.contains(&"--handler") {
        args.extend(["--handler", "http"]);
    }
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:8080"]);
    }
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

/// Runs parsrv with `args` (and `setup` before exec), and checks the error contract: exit
/// `code`, an error of one line (after any log lines) naming every one of `words`, nothing
/// left behind. Returns its stderr.
fn expect_error(
    args: &[String],
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    code: i32,
    words: &[&str],
) -> String {
    let programs_before = loaded_parsrv_programs();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (exit, stderr) = run_parsrv(&args, setup);
    assert_eq!(exit, code, "{args:?}: {stderr}");
    let error = error_line(&stderr);
    for word in words {
        assert!(error.contains(word), "{args:?}: {error:?} lacks {word:?}");
    }
    assert!(!pin_dir(NAME).exists(), "{args:?} left pins");
    assert!(
        !control::socket_path(NAME).exists(),
        "{args:?} left a control socket"
    );
    assert_eq!(
        processes_mentioning(&format!("--name {NAME}")),
        Vec::<u32>::new()
    );
    assert_eq!(
        loaded_parsrv_programs(),
        programs_before,
        "{args:?} left a program"
    );
    eprintln!("{args:?} -> exit {exit}: {error}");
    stderr
}

fn nothing_listens() {
    assert_eq!(
        connect(addr(), Duration::from_secs(1)).unwrap_err(),
        Outcome::Refused
    );
}

/// An executable in a directory only root may enter.
const PRIVATE_SERVER: &str = "/tmp/parsrv-private/server";

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn usage_errors_exit_2_naming_the_option() {
    let needs = Needs::nothing().host_only(
        "checks command-line errors, refused before parsrv touches the kernel (40 runs of \
         parsrv: 13 s of a VM for 1 s here)",
    );
    privileged(needs, || {
        use std::os::unix::fs::PermissionsExt;
        let private = std::path::Path::new(PRIVATE_SERVER).parent().unwrap();
        std::fs::create_dir_all(private).unwrap();
        std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(PRIVATE_SERVER, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(PRIVATE_SERVER, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ok = || Ok(());
        for (extra, words) in [
            (
                &["--listen", "localhost:80"][..],
                &["--listen", "ADDR:PORT"][..],
            ),
            (&["--listen", "127.0.0.1:0"], &["--listen", "fixed port"]),
            // Several addresses, prefixes and port ranges.
            (
                &["--listen", "127.0.0.1:9000-8000"],
                &["--listen", "upside down", "8000-9000"],
            ),
            (
                &["--listen", "127.0.0.0/64:80"],
                &["--listen", "not 0 to 32", "IPv4"],
            ),
            (
                &["--listen", "[127.0.0.0/8]:80"],
                &["--listen", "ADDR:PORT"],
            ),
            (
                &["--listen", "127.0.0.0/29:80", "--listen", "127.0.0.2:80"],
                &[
                    "--listen '127.0.0.2:80'",
                    "overlaps --listen 127.0.0.0/29:80",
                ],
            ),
            (
                &[
                    "--listen",
                    "127.0.0.2:80",
                    "--listen",
                    "127.0.0.3:80",
                    "--handlers",
                    "1",
                ],
                &["--handlers", "its own handler", "at least 2"],
            ),
            // UDP groups: what they do not have is refused, not ignored.
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--handler",
                    "echo",
                    "--policy",
                    "redirect",
                ],
                &["--policy", "a TCP setting"],
            ),
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--handler",
                    "echo",
                    "--affinity",
                    "client",
                ],
                &["--affinity", "no client affinity yet"],
            ),
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--listen",
                    "127.0.0.1:8081",
                    "--handler",
                    "echo",
                ],
                &["--listen", "two groups"],
            ),
            (
                &["--listen", "udp://127.0.0.0/29:53", "--handler", "echo"],
                &["--listen", "one address and port"],
            ),
            (
                &["--listen", "udp://127.0.0.1:8080"],
                &["--handler", "HTTP is TCP"],
            ),
            (
                &["--listen", "quic://127.0.0.1:443"],
                &["--listen", "udp://ADDR:PORT"],
            ),
            // UDP modes: a UDP setting on a TCP group, a flow setting without flow mode, a
            // mode that does not exist.
            (&["--udp-mode", "flow"], &["--udp-mode", "is a UDP setting"]),
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--handler",
                    "echo",
                    "--flow-timeout",
                    "5",
                ],
                &["--flow-timeout", "only applies with --udp-mode flow"],
            ),
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--handler",
                    "echo",
                    "--udp-mode",
                    "flow",
                    "--flow-table",
                    "0",
                ],
                &["--flow-table", "1 to"],
            ),
            (
                &[
                    "--listen",
                    "udp://127.0.0.1:8080",
                    "--handler",
                    "echo",
                    "--udp-mode",
                    "stream",
                ],
                &[
                    "stream",
                    "--udp-mode",
                    "possible values: datagram, flow, quic",
                ],
            ),
            (&["--handlers", "0"], &["--handlers", "1 to 128"]),
            (&["--handlers", "129"], &["--handlers", "1 to 128"]),
            (&["--backlog", "0"], &["--backlog", "at least 1"]),
            (&["--threads", "0"], &["--threads"]),
            (
                &["--policy", "random"],
                &[
                    "random",
                    "--policy",
                    "possible values: redirect, least-loaded",
                ],
            ),
            (&["--handlers", "many"], &["many", "--handlers"]),
            (&["--nonblocking=maybe"], &["maybe", "--nonblocking"]),
            (
                &["--handler", "http", "--notify"],
                &["--notify", "only for --handler exec"],
            ),
            (
                &["--handler-kind", "http"],
                &["--handler-kind", "--handler"],
            ),
            // Exec handlers, CPUs, users.
            (
                &["--handler", "exec"],
                &["--handler", "give the program after `--`"],
            ),
            (
                &["--handler", "exec", "--", "no-such-server"],
                &["no-such-server", "not found in PATH"],
            ),
            (
                &["--handler", "exec", "--", "/etc/passwd"],
                &["/etc/passwd", "chmod +x"],
            ),
            (
                &["--handler", "http", "--", "sleep"],
                &["needs --handler exec"],
            ),
            // Client affinity.
            (
                &["--affinity", "client", "--affinity-prefix", "33,64"],
                &["--affinity-prefix", "1 to 32"],
            ),
            (
                &["--affinity", "client", "--affinity-prefix", "24,129"],
                &["--affinity-prefix", "1 to 128"],
            ),
            (
                &["--affinity", "client", "--affinity-prefix", "24"],
                &["--affinity-prefix", "V4LEN,V6LEN"],
            ),
            (
                &["--affinity", "client", "--affinity-timeout", "0"],
                &["--affinity-timeout", "1 to 604800"],
            ),
            (
                &["--affinity", "client", "--affinity-table", "0"],
                &["--affinity-table", "1 to 4194304"],
            ),
            (
                &["--affinity", "client", "--affinity-table", "4194305"],
                &["--affinity-table", "512 MiB"],
            ),
            (
                &["--env", "LISTEN_FDS=2"],
                &["--env", "LISTEN_FDS", "socket activation"],
            ),
            (
                &["--affinity-timeout", "60"],
                &["--affinity-timeout", "--affinity client"],
            ),
            (
                &["--affinity-when-full", "keep"],
                &["--affinity-when-full", "--affinity client"],
            ),
            (
                &["--affinity", "sticky"],
                &["sticky", "--affinity", "possible values: none, client"],
            ),
            (&["--cpus", "4095"], &["--cpus", "usable"]),
            (&["--cpus", "0-x"], &["--cpus", "e.g. 0-3"]),
            (
                &["--user", "no-such-user-parsrv"],
                &["--user", "no such user"],
            ),
            (
                &[
                    "--user",
                    "nobody",
                    "--handler",
                    "exec",
                    "--",
                    PRIVATE_SERVER,
                ],
                &[
                    "user nobody cannot run it",
                    "no search permission on /tmp/parsrv-private",
                ],
            ),
        ] {
            expect_error(&run_group(extra), ok, 2, words);
        }
        // A missing required flag is named (clap lists it on a line of its own).
        let without_handler: Vec<String> = ["run", "--name", NAME, "--listen", "127.0.0.1:8080"]
            .map(String::from)
            .to_vec();
        expect_error(
            &without_handler,
            ok,
            2,
            &[
                "required arguments were not provided",
                "--handler <HANDLER>",
            ],
        );
        nothing_listens();
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn addresses_not_on_this_host_and_overlapping_groups_exit_2_leaving_no_link() {
    privileged(Needs::program().and(Feature::SkLookup), || {
        let ok = || Ok(());
        for listen in [
            &["--listen", "192.0.2.1:8080"][..],
            &["--listen", "127.0.0.2:8080", "--listen", "192.0.2.0/29:80"],
            &[
                "--listen",
                "127.0.0.2:8080",
                "--listen",
                "198.51.100.0/24:80",
            ],
        ] {
            let mut args = listen.to_vec();
            args.extend(["--handlers", "3"]);
            expect_error(
                &run_group(&args),
                ok,
                2,
                &["--listen", "not an address of this host", "ip addr add"],
            );
            assert_eq!(
                parsrv_lookup_links(),
                Vec::<u32>::new(),
                "{listen:?} left a link"
            );
        }
        // A group that serves a prefix nobody binds: another group inside it is refused,
        // naming both; the bind check alone would not see it (nothing is bound there).
        let running = group("prefix-owner", HandlerKind::Http)
            .listen_on(&["127.0.0.0/29:9000"])
            .handlers(1)
            .start();
        let links = parsrv_lookup_links();
        assert_eq!(links.len(), 1);
        expect_error(
            &run_group(&["--listen", "127.0.0.5:9000"]),
            ok,
            2,
            &[
                "127.0.0.5:9000",
                "overlaps group 'prefix-owner'",
                "127.0.0.0/29:9000",
            ],
        );
        assert_eq!(
            parsrv_lookup_links(),
            links,
            "the refusal changed the links"
        );
        assert!(running.stop().success());
        assert_eq!(parsrv_lookup_links(), Vec::<u32>::new());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn address_held_outside_the_group_is_refused() {
    privileged(Needs::program(), || {
        // A plain listener, first on a machine that has just booted: parsrv mounts bpffs,
        // logs that, and then refuses; the error is still one line of its own.
        let plain = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
        unmount_bpffs();
        let stderr = expect_error(
            &run_group(&[]),
            || Ok(()),
            1,
            &["already in use", "--listen"],
        );
        let logs: Vec<&str> = stderr
            .lines()
            .filter(|l| parsrv::output::is_log_line(l))
            .collect();
        assert_eq!(logs.len(), 1, "{stderr}");
        assert!(
            logs[0].ends_with("] INFO: mounted bpffs at /sys/fs/bpf"),
            "{stderr}"
        );
        // Where bpffs is mounted already, nothing is logged: the error alone.
        assert!(bpffs_mounted());
        let stderr = expect_error(&run_group(&[]), || Ok(()), 1, &["already in use"]);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        drop(plain);

        // Another user's SO_REUSEPORT listener: joining it would steer a stranger's group.
        // `sleep` as nobody, holding a socket its pre-exec step (after setuid) opened.
        let mut stranger = Command::new("sleep");
        stranger.arg("60").uid(65534).gid(65534);
        // SAFETY: only raw system calls between fork and exec.
        unsafe {
            stranger.pre_exec(|| {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let one: libc::c_int = 1;
                let address = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 8080u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let failed = fd < 0
                    || libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_REUSEPORT,
                        (&one as *const libc::c_int).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    ) < 0
                    || libc::bind(
                        fd,
                        (&address as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    ) < 0
                    || libc::listen(fd, 8) < 0;
                if failed {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // spawn() returns once the child has exec'd: its socket listens by then.
        let mut stranger = stranger.spawn().expect("a listener as nobody");
        expect_error(&run_group(&[]), || Ok(()), 1, &["already in use"]);
        signal(stranger.id(), nix::sys::signal::Signal::SIGKILL);
        stranger.wait().unwrap();
        nothing_listens();
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn missing_privileges_bpffs_btf_or_object_exit_1_naming_the_fix() {
    privileged(Needs::program(), || {
        // Capabilities, dropped from the bounding set so that even root lacks them.
        expect_error(
            &run_group(&[]),
            || drop_capability(39),
            1,
            &["CAP_BPF", "root"],
        );
        expect_error(
            &run_group(&[]),
            || drop_capability(38),
            1,
            &["CAP_PERFMON", "root"],
        );
        // The socket map (6.1 asks for CAP_NET_ADMIN alone; newer kernels also take
        // CAP_SYS_ADMIN, which root keeps here): refused before anything is created, not by
        // an EPERM from the map's creation.
        expect_error(
            &run_group(&[]),
            || drop_capability(12),
            1,
            &["CAP_NET_ADMIN", "root"],
        );

        // No bpffs and no right to mount it.
        unmount_bpffs();
        expect_error(
            &run_group(&[]),
            || drop_capability(21), // CAP_SYS_ADMIN
            1,
            &["bpffs", "mount -t bpf bpf /sys/fs/bpf"],
        );
        assert!(!bpffs_mounted());
        mount_bpffs().unwrap();

        // A kernel without BTF (as parsrv sees it).
        std::env::set_var("PARSRV_VMLINUX_BTF", "/nonexistent/vmlinux");
        expect_error(
            &run_group(&[]),
            || Ok(()),
            1,
            &["BTF", "CONFIG_DEBUG_INFO_BTF"],
        );
        std::env::remove_var("PARSRV_VMLINUX_BTF");

        // A failed eBPF build: an empty object, then one that is not ELF.
        let empty = std::env::temp_dir().join("parsrv-test-empty.o");
        std::fs::write(&empty, b"").unwrap();
        std::env::set_var("PARSRV_EBPF_OBJECT", &empty);
        expect_error(
            &run_group(&[]),
            || Ok(()),
            1,
            &["eBPF", "cargo xtask build"],
        );
        std::fs::write(&empty, b"not an object").unwrap();
        expect_error(
            &run_group(&[]),
            || Ok(()),
            1,
            &["not an ELF", "cargo xtask build"],
        );
        std::env::remove_var("PARSRV_EBPF_OBJECT");
        nothing_listens();
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_second_run_of_a_running_group_is_refused() {
    privileged(Needs::program(), || {
        let spawner = group(NAME, HandlerKind::Http).handlers(2).start();
        // Same group name again: refused, and the running group is untouched.
        let programs = loaded_parsrv_programs();
        let (exit, stderr) = run_parsrv(
            &[
                "run",
                "--name",
                NAME,
                "--listen",
                "127.0.0.1:8081",
                "--handler",
                "echo",
            ],
            || Ok(()),
        );
        assert_eq!(exit, 1, "{stderr}");
        let error = error_line(&stderr);
        assert!(
            error.contains(&format!("already running under spawner {}", spawner.pid()))
                && error.contains("--name"),
            "{stderr}"
        );
        assert_eq!(loaded_parsrv_programs(), programs);
        assert!(spawner.status().handlers.iter().all(|h| h.alive));
        assert!(control::socket_path(NAME).exists());
        assert!(spawner.stop().success());
        assert!(!control::socket_path(NAME).exists());
    });
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn status_without_a_running_group_says_how_to_start_one() {
    privileged(Needs::nothing(), || {
        let (exit, stderr) = run_parsrv(&["status", "no-such-group"], || Ok(()));
        assert_eq!(exit, 1, "{stderr}");
        let error = error_line(&stderr);
        assert!(
            error.contains("no running parsrv group named 'no-such-group'"),
            "{stderr}"
        );
        assert!(error.contains("parsrv run"), "{stderr}");
    });
}

/// parsrv's probes find every feature on a kernel whose release has it (Debian's and
/// mainline's configurations enable them all), `parsrv kernel` exits 1 exactly when one is
/// missing, and there `parsrv run` refuses with one line naming it, leaving nothing behind.
/// On a new kernel the refusal is not reachable; the VM suite runs this on Linux 5.10.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn kernel_features_follow_the_release_and_a_missing_one_is_refused_by_name() {
    privileged(Needs::nothing(), kernel_features_follow_the_release);
}

fn kernel_features_follow_the_release() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let version = KernelVersion::parse(release.trim()).expect("a kernel release");
    let out = Command::new(parsrv_integration_tests::parsrv_bin())
        .args(["kernel", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["release"], release.trim());
    let mut missing = Vec::new();
    for feature in report["features"].as_array().unwrap() {
        let since = KernelVersion::parse(feature["since"].as_str().unwrap()).unwrap();
        let present = feature["present"].as_bool().unwrap();
        // A kernel new enough must have it. An older one may too: distributions backport
        // (Debian's 5.10 has net.ipv4.tcp_migrate_req), which is why parsrv probes.
        assert!(
            present || version < since,
            "{release} should have it: {feature}"
        );
        // Only what groups need decides the exit code (tcx serves the cluster dispatcher).
        if !present && feature["required"].as_bool().unwrap() {
            missing.push(feature["name"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        report["features"].as_array().unwrap().len(),
        Feature::ALL.len()
    );
    assert_eq!(
        out.status.code(),
        Some(if missing.is_empty() { 0 } else { 1 }),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(first) = missing.first().cloned() else {
        return;
    };
    eprintln!("kernel {release} lacks {missing:?}");
    expect_error(
        &run_group(&[]),
        || Ok(()),
        1,
        &[&first, "Linux 5.17", "parsrv kernel"],
    );
    nothing_listens();
}
