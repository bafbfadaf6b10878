//! Trust boundaries: what a handler (code parsrv does not control) cannot do to the group
//! it serves. Each test does the attack from inside parsrv and, as a control, the same
//! attack where parsrv does not protect, to show that it would work.

use std::{
    io::{Read, Write},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    process::Command,
    time::Duration,
};

use parsrv_integration_tests::{addr, connect, group, privileged, wait_for, HandlerKind, Needs};

/// A handler that first tries, on its socket (fd 3), what would take the group's steering
/// away: replace the group's program with a classic BPF one that always picks socket 0,
/// detach it, and clear the spawner's "no handler" mark; it prints what the kernel said,
/// then echoes one line per connection.
const ATTACK: &str = r#"
import ctypes, socket, struct
s = socket.socket(fileno=3)
ret_0 = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K 0
fprog = struct.pack("HL", 1, ctypes.addressof(ret_0))  # struct sock_fprog
said = []
for name, option, value in [("attach_cbpf", 51, fprog), ("detach", 68, 0), ("incoming_cpu", 49, -1)]:
    try:
        s.setsockopt(socket.SOL_SOCKET, option, value)
        said.append(f"{name}=ok")
    except OSError as e:
        said.append(f"{name}=errno{e.errno}")
print("attack " + " ".join(said), flush=True)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(64))
    c.close()
"#;

fn echo_once(timeout: Duration) -> bool {
    let Ok(mut stream) = connect(addr(), timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut echo = [0u8; 5];
    stream.write_all(b"hello").is_ok() && stream.read_exact(&mut echo).is_ok() && &echo == b"hello"
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_handler_cannot_replace_detach_or_unmark_the_groups_program() {
    privileged(Needs::program().and_python(), || {
        let spawner = group("test-contained", HandlerKind::Exec)
            .handlers(2)
            .command(&["/usr/bin/python3", "-c", ATTACK])
            .start();
        assert!(
            wait_for(Duration::from_secs(10), || spawner
                .log()
                .matches("attack ")
                .count()
                == 2),
            "{}",
            spawner.log()
        );
        let log = spawner.log();
        for line in log.lines().filter(|l| l.contains("attack ")) {
            assert!(
                line.ends_with("attack attach_cbpf=errno1 detach=errno1 incoming_cpu=errno1"),
                "a handler changed the group's steering: {line}"
            );
        }
        for handler in spawner.status().handlers {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", handler.pid.unwrap())).unwrap();
            for field in ["NoNewPrivs:\t1", "Seccomp:\t2"] {
                assert!(status.contains(field), "no {field:?} in\n{status}");
            }
        }
        // The program still decides every connection.
        let selected = || -> u64 {
            spawner
                .status()
                .sockets
                .iter()
                .map(|s| s.counters.selected)
                .sum()
        };
        let before = selected();
        let connections = 20;
        for _ in 0..connections {
            assert!(echo_once(Duration::from_secs(5)));
        }
        assert_eq!(selected() - before, connections);
        assert!(spawner.stop().success());

        // Control: the same handler on a socket of a plain SO_REUSEPORT group that has a
        // classic BPF selector, outside parsrv: the kernel lets it do all three.
        let plain =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        plain.set_reuse_port(true).unwrap();
        plain.set_reuse_address(true).unwrap();
        plain.bind(&addr().into()).unwrap();
        plain.listen(8).unwrap();
        let fd = plain.as_raw_fd();
        let mut child = Command::new("/usr/bin/python3");
        child
            .args(["-c", ATTACK])
            .stdout(std::process::Stdio::piped());
        // SAFETY: dup2 or fcntl only, between fork and exec.
        unsafe {
            child.pre_exec(move || {
                // dup2 onto itself would keep FD_CLOEXEC.
                let kept = if fd == 3 {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if kept < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = child.spawn().unwrap();
        let mut said = String::new();
        let mut stdout = child.stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while !said.ends_with('\n') && stdout.read(&mut byte).unwrap_or(0) == 1 {
            said.push(byte[0] as char);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            said.trim(),
            "attack attach_cbpf=ok detach=ok incoming_cpu=ok",
            "the control could not do what the handler tried"
        );
    });
}

/// Sends `request` to the control socket at `path` as `uid` (in a child process, since a
/// process that gave up root cannot take it back); returns the answer line, empty if the
/// spawner closed without one.
fn ask_as(uid: u32, path: &std::path::Path, request: &str) -> String {
    use std::os::unix::net::UnixStream;
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let path = path.to_owned();
    let request = request.to_owned();
    // SAFETY: the child only makes system calls, then _exits.
    match unsafe { libc::fork() } {
        0 => {
            let mut theirs = theirs;
            // SAFETY: setgid/setuid on our own process.
            let dropped = unsafe { libc::setgid(uid) == 0 && libc::setuid(uid) == 0 };
            let answer = dropped
                .then(|| {
                    let mut stream = UnixStream::connect(&path).ok()?;
                    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    // A refused connection may be closed before the request is written.
                    let _ = stream.write_all(request.as_bytes());
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer);
                    Some(answer)
                })
                .flatten()
                .unwrap_or_else(|| b"(no connection)".to_vec());
            let _ = theirs.write_all(&answer);
            // SAFETY: ends the child without the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        child => {
            drop(theirs);
            let mut answer = String::new();
            let _ = ours.read_to_string(&mut answer);
            let mut status = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            answer
        }
    }
}

/// A local user who can reach a control socket (its file's mode widened by mistake) gets
/// no answer: the spawner checks the peer's uid. Root's request, the control, is answered.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_local_user_gets_no_answer_from_a_control_socket_even_when_its_mode_lets_them_in() {
    privileged(Needs::program(), || {
        use std::os::unix::fs::PermissionsExt;
        let name = "test-peercred";
        let spawner = group(name, HandlerKind::Http).start();
        let path = parsrv::control::socket_path(name);
        let open = std::fs::Permissions::from_mode;
        std::fs::set_permissions(parsrv::run_dir::run_dir(), open(0o755)).unwrap();
        std::fs::set_permissions(&path, open(0o666)).unwrap();
        let request = serde_json::to_string(&parsrv::control::Request::Status).unwrap() + "\n";
        let request = request.as_str();
        let nobody = ask_as(65534, &path, request);
        assert_eq!(nobody, "", "uid 65534 got an answer");
        assert!(
            spawner
                .log()
                .contains("refused a control connection from uid 65534"),
            "{}",
            spawner.log()
        );
        // Control: the same request as root, over the same path, is answered.
        let root = ask_as(0, &path, request);
        assert!(root.contains("\"handlers\""), "{root}");
        assert!(spawner.stop().success());
    });
}

/// "Max open files" of a process, as (soft, hard).
fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

/// The spawner raises its soft limit on open files to the hard one (so that the admin
/// endpoint or many slots cannot exhaust it); its handlers get the soft limit it started
/// with, as any service would.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn the_spawner_raises_its_fd_limit_and_handlers_keep_the_usual_one() {
    privileged(Needs::program(), || {
        // As a service starts under systemd: a soft limit of 1,024 below a higher hard one
        // (this test's process is its own; the spawner inherits it).
        let mut ours = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours), 0);
            ours.rlim_cur = 1024;
            if ours.rlim_max <= 1024 {
                ours.rlim_max = 4096;
            }
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &ours), 0);
        }
        let spawner = group("test-nofile", HandlerKind::Http).handlers(2).start();
        let (soft, hard) = fd_limits(spawner.pid());
        assert_eq!(
            (soft, hard.clone()),
            (hard.clone(), ours.rlim_max.to_string())
        );
        for handler in spawner.status().handlers {
            assert_eq!(
                fd_limits(handler.pid.unwrap()),
                (ours.rlim_cur.to_string(), ours.rlim_max.to_string())
            );
        }
        assert!(spawner.stop().success());
    });
}

/// Writes a record for group `spec.name` naming `pid` as slot 0's handler, as a spawner
/// that died would have left it, owned by `uid`.
fn plant_record(spec: &parsrv::spec::GroupSpec, pid: u32, uid: u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    // Field 22 of stat, the 20th after the name: the start time that makes the pid exact.
    let start_time: u64 = after_name.split(' ').nth(19).unwrap().parse().unwrap();
    let record = serde_json::json!({
        "spawner_pid": std::process::id(),
        "spec": spec,
        "slots": [{
            "cookie": 4242,
            "handler": { "pid": pid, "start_time": start_time, "restarts": 0, "ready": true }
        }]
    });
    let path = parsrv::spawner::record_path(&spec.name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, record.to_string()).unwrap();
    std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
}

/// A record is what a spawner acts on when it takes a group over: one naming a process
/// that is no handler of the group (any process, with its exact start time) must not get
/// that process signalled, whether root wrote it or a local user could plant it. Control:
/// the process is signalled by nobody else meanwhile, and the group starts anew.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_forged_record_gets_no_process_signalled() {
    privileged(Needs::program(), || {
        let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = bystander.id();
        for (owner, says) in [
            (0, "does not show that it is this slot's handler"),
            (65534, "not root's own file"),
        ] {
            let builder = group("test-forged", HandlerKind::Http).handlers(1);
            plant_record(&builder.spec, pid, owner);
            let spawner = builder.start();
            let log = spawner.log();
            assert!(spawner.stop().success());
            assert!(
                bystander.try_wait().unwrap().is_none(),
                "the bystander (record owned by uid {owner}) was killed\n{log}"
            );
            assert!(log.contains(says), "{log}");
        }
        let _ = bystander.kill();
        let _ = bystander.wait();
    });
}

/// A run directory another user could write (a planted record or socket would make root
/// act on it) is refused before anything starts: one line naming the path and the fix,
/// exit 1. Control: the same command in the same directory made root's again serves.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_run_directory_others_can_write_is_refused() {
    privileged(Needs::program(), || {
        use std::os::unix::fs::PermissionsExt;
        let dir = parsrv::run_dir::run_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let mut run = Command::new(parsrv_integration_tests::parsrv_bin())
            .args(["run", "--listen", "127.0.0.1:8080", "--handler", "http"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_for(Duration::from_secs(20), || {
            run.try_wait().unwrap().is_some()
        });
        if !exited {
            // It started: stop it as a user would, so that its handlers go too.
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
            if !wait_for(Duration::from_secs(20), || {
                run.try_wait().unwrap().is_some()
            }) {
                let _ = run.kill();
            }
        }
        let out = run.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            exited,
            "parsrv run started in an untrusted run directory: {stderr}"
        );
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "{} is writable by others (mode 1777)",
                dir.display()
            )) && stderr.contains("chmod 0700"),
            "{stderr}"
        );
        assert!(
            connect(addr(), Duration::from_secs(1)).is_err(),
            "it serves"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let spawner = group("test-run-dir", HandlerKind::Http).start();
        assert!(echo_or_http(&spawner));
        assert!(spawner.stop().success());
    });
}

fn echo_or_http(spawner: &parsrv_integration_tests::Spawner) -> bool {
    !spawner.status().handlers.is_empty()
        && parsrv_integration_tests::http_get(addr(), Duration::from_secs(5))
            == parsrv_integration_tests::Outcome::Ok
}

/// `parsrv check` says what a dispatch table costs, and the figure is the kernel's own
/// (`memlock` of the pinned map's fdinfo, which counts a fixed few KiB more: the map's
/// header and bucket locks); a table above the bound is refused before anything is
/// allocated, one line naming the option.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_dispatch_tables_memory_is_said_beforehand_and_bounded() {
    privileged(Needs::program(), || {
        use parsrv::spec::Affinity;
        use parsrv_common::reuseport::affinity::{
            lru_table_bytes, ClientKey, DispatchEntry, MAX_TABLE_SIZE,
        };
        let entries = 65_536;
        let builder = group("test-table", HandlerKind::Http).with(|s| {
            s.affinity = Affinity::Client;
            s.affinity_table = entries;
        });
        let said = builder.spec.table_memory().unwrap();
        let spawner = builder.start();
        let pin = parsrv::dataplane::pins::group_dir("test-table")
            .join(parsrv_common::reuseport::names::DISPATCH_TABLE);
        let map = aya::maps::MapData::from_pin(&pin).unwrap();
        let fdinfo = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(map.fd()))
        ))
        .unwrap();
        let field = |name: &str| -> u64 {
            fdinfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {fdinfo}"))
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(field("max_entries:"), entries as u64);
        let estimate = lru_table_bytes(entries, size_of::<ClientKey>(), size_of::<DispatchEntry>());
        let kernel = field("memlock:");
        eprintln!("{said}; the kernel's memlock: {kernel} bytes, estimated {estimate}");
        // The kernel counts a hash map's own usage since 6.4 (htab_map_mem_usage); before,
        // memlock is a rough key-plus-value figure of its own.
        let release = nix::sys::utsname::uname().unwrap();
        let release = release.release().to_string_lossy().into_owned();
        let counted = parsrv::features::KernelVersion::parse(&release).unwrap()
            >= parsrv::features::KernelVersion::parse("6.4").unwrap();
        if counted {
            assert!(
                (estimate..estimate + 64 * 1024).contains(&kernel),
                "estimated {estimate} bytes, the kernel says {kernel}"
            );
        } else {
            eprintln!("{release}: memlock is not the map's usage before 6.4: not compared");
        }
        assert!(said.contains(&format!("{:.1} MiB", estimate as f64 / (1 << 20) as f64)));
        assert!(spawner.stop().success());

        // One digit too many: refused before anything is created.
        let out = Command::new(parsrv_integration_tests::parsrv_bin())
            .args(["run", "--listen", "127.0.0.1:8080", "--handler", "http"])
            .args(["--affinity", "client", "--affinity-table"])
            .arg((MAX_TABLE_SIZE as u64 * 10).to_string())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--affinity-table") && stderr.contains("512 MiB"),
            "{stderr}"
        );
        assert!(!pin.exists());
    });
}

/// Handlers do not get the spawner's environment (root's HOME, a secret it was started
/// with): only PATH and the locale, the group's own `env`, and socket activation's
/// variables. Control: the spawner itself has the secret.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn handlers_get_a_clean_environment_not_the_spawners() {
    privileged(Needs::program(), || {
        let spawner = group("test-env", HandlerKind::Exec)
            .handlers(1)
            .with(|s| s.env = vec!["APP_MODE=prod".parse().unwrap()])
            .env("SECRET_TOKEN", "s3cr3t")
            .env("HOME", "/root")
            .command(&[
                "/bin/sh",
                "-c",
                "tr '\\0' '\\n' < /proc/$$/environ | sed 's/^/env /'; exec sleep 60",
            ])
            .start();
        assert!(wait_for(Duration::from_secs(10), || spawner
            .log()
            .contains("env LISTEN_FDS=1")));
        let log = spawner.log();
        let seen: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once(": env ").map(|(_, v)| v))
            .collect();
        let names: Vec<&str> = seen
            .iter()
            .map(|v| v.split_once('=').map_or(*v, |(k, _)| k))
            .collect();
        assert!(seen.contains(&"APP_MODE=prod"), "{seen:?}");
        assert!(names.contains(&"PATH"), "{seen:?}");
        for absent in ["SECRET_TOKEN", "HOME"] {
            assert!(
                !names.contains(&absent),
                "{absent} reached the handler: {seen:?}"
            );
        }
        // Control: the spawner was started with them.
        let own = std::fs::read(format!("/proc/{}/environ", spawner.pid())).unwrap();
        assert!(String::from_utf8_lossy(&own).contains("SECRET_TOKEN=s3cr3t"));
        assert!(spawner.stop().success());
    });
}

/// A handler that shuts its socket down (the kernel then takes it out of the group: its slot
/// would get no connection again) gets it back: the spawner notices and puts it back, and
/// the handler, accepting on, serves again.
const SHUTS_DOWN: &str = r#"
import os, socket, sys, time
s = socket.socket(fileno=3)
try:
    os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))
    s.shutdown(socket.SHUT_RD)
    print("shut down", flush=True)
except FileExistsError:
    pass
while True:
    try:
        c, _ = s.accept()
    except OSError:
        time.sleep(0.05)
        continue
    c.sendall(c.recv(64))
    c.close()
"#;

/// Listening sockets on the test's address in this thread's namespace (its /proc/net/tcp,
/// state 0A; /proc/net is the process's main thread's).
fn listening_on_addr() -> usize {
    let local = format!("0100007F:{:04X}", addr().port());
    std::fs::read_to_string("/proc/thread-self/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "0A"
        })
        .count()
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_socket_a_handler_shuts_down_is_put_back() {
    privileged(Needs::program().and_python(), || {
        let marker = std::env::temp_dir().join(format!("parsrv-shut-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let spawner = group("test-shutdown", HandlerKind::Exec)
            .handlers(2)
            .command(&[
                "/usr/bin/python3",
                "-c",
                SHUTS_DOWN,
                marker.to_str().unwrap(),
            ])
            .start();
        assert!(
            wait_for(Duration::from_secs(10), || spawner
                .log()
                .contains("was out of the group, shut down by its handler")),
            "{}",
            spawner.log()
        );
        assert!(spawner.log().contains("shut down"), "{}", spawner.log());
        assert!(
            wait_for(Duration::from_secs(5), || listening_on_addr() == 2),
            "{} listening:\n{}",
            listening_on_addr(),
            std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap()
        );
        for _ in 0..40 {
            assert!(echo_once(Duration::from_secs(5)));
        }
        let counters: Vec<u64> = spawner
            .status()
            .sockets
            .iter()
            .map(|s| s.counters.selected)
            .collect();
        assert!(counters.iter().all(|&c| c > 0), "{counters:?}");
        assert!(spawner.stop().success());
        let _ = std::fs::remove_file(&marker);
    });
}

/// A prefix and port range is served through sk_lookup, which takes precedence over the
/// kernel's own socket lookup: a plain server already listening inside it would lose its
/// clients silently, so the group is refused, naming it; one that starts listening inside
/// it later (its bind succeeds) is reported. Control: that later server gets none of the
/// connections to its own address.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_range_with_a_server_inside_is_refused_and_one_started_later_is_reported() {
    privileged(
        Needs::program().and(parsrv_integration_tests::Feature::SkLookup),
        || {
            let range = "127.0.0.8/29:9001-9003";
            let inside = std::net::TcpListener::bind("127.0.0.12:9002").unwrap();
            let out = Command::new(parsrv_integration_tests::parsrv_bin())
                .args(["run", "--name", "test-range", "--handler", "echo"])
                .args(["--listen", range])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains("127.0.0.12:9002 is inside --listen 127.0.0.8/29:9001-9003")
                    && stderr.contains(&format!("pid {} (", std::process::id())),
                "{stderr}"
            );
            assert!(!parsrv::dataplane::pins::group_dir("test-range").exists());
            drop(inside);

            let spawner = group("test-range", HandlerKind::Echo)
                .listen_on(&[range])
                .handlers(1)
                .start();
            let late = std::net::TcpListener::bind("127.0.0.13:9003").unwrap();
            late.set_nonblocking(true).unwrap();
            assert!(
                wait_for(Duration::from_secs(10), || spawner
                    .log()
                    .contains("listens on 127.0.0.13:9003 inside --listen")),
                "{}",
                spawner.log()
            );
            // Control: a client of the late server's own address reaches the group.
            let mut stream = std::net::TcpStream::connect_timeout(
                &"127.0.0.13:9003".parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(b"hello").unwrap();
            let mut echo = [0u8; 5];
            stream.read_exact(&mut echo).unwrap();
            assert!(late.accept().is_err(), "the late server got the connection");
            assert!(spawner.stop().success());
        },
    );
}

/// Binds the notify address a previous release gave slot 0 of `test-notify-squat`
/// (abstract: any local user may bind any name), says so, and holds it.
const SQUAT: &str = r#"
import socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0parsrv-notify/test-notify-squat/0")
print("bound", flush=True)
time.sleep(120)
"#;

/// An exec handler that says READY=1 on $NOTIFY_SOCKET (as sd_notify does: `@` is an
/// abstract address), then echoes one line per connection.
const NOTIFYING_HANDLER: &str = r#"
import os, socket
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", address)
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(64))
    c.close()
"#;

/// A local user cannot keep a `--notify` handler from ever being ready by binding its
/// socket's name first (the previous release's abstract names allowed it), nor speak on a
/// handler's socket: it is a path under the run directory, owned by the handler's user,
/// mode 0600, in directories only root can write.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn a_local_user_cannot_squat_or_speak_on_a_handlers_notify_socket() {
    privileged(Needs::program(), || {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let name = "test-notify-squat";
        let mut squatter = KilledOnDrop(
            Command::new("/usr/bin/python3")
                .args(["-c", SQUAT])
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut said = [0u8; 6];
        squatter
            .0
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut said)
            .unwrap();
        // The control: the name the previous release would have bound is taken.
        assert_eq!(&said, b"bound\n");
        let spawner = group(name, HandlerKind::Exec)
            .handlers(2)
            .with(|g| {
                g.notify = true;
                g.user = Some("nobody".into());
            })
            .command(&["/usr/bin/python3", "-c", NOTIFYING_HANDLER])
            .start_answering();
        assert!(
            spawner.wait_until_ready(Duration::from_secs(30)),
            "a handler never became ready: {}",
            spawner.log()
        );
        let run_dir = parsrv::run_dir::run_dir();
        for (slot, handler) in spawner.status().handlers.iter().enumerate() {
            let environ = std::fs::read(format!("/proc/{}/environ", handler.pid.unwrap())).unwrap();
            let socket = run_dir.join(format!("notify/{name}/{slot}"));
            let expected = format!("NOTIFY_SOCKET={}", socket.display());
            assert!(
                environ.split(|b| *b == 0).any(|v| v == expected.as_bytes()),
                "handler {slot} lacks {expected}"
            );
            let meta = std::fs::metadata(&socket).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));
        }
        for dir in [
            run_dir.clone(),
            run_dir.join("notify"),
            run_dir.join(format!("notify/{name}")),
        ] {
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o711), "{dir:?}");
        }
        // Another local user may not send on a handler's socket; root may (the control).
        let send_as = |uid: u32| {
            let socket = run_dir.join(format!("notify/{name}/0"));
            let sent = Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\
                     .sendto(b'STATUS=x', sys.argv[1])",
                ])
                .arg(&socket)
                .uid(uid)
                .gid(uid)
                .output()
                .unwrap();
            (
                sent.status.success(),
                String::from_utf8_lossy(&sent.stderr).into_owned(),
            )
        };
        let (sent, stderr) = send_as(1);
        assert!(
            !sent && stderr.contains("PermissionError"),
            "uid 1: {stderr}"
        );
        assert_eq!(send_as(0), (true, String::new()));
        assert!(spawner.stop().success());
        assert!(!run_dir.join(format!("notify/{name}/0")).exists());
    });
}

/// A process this test started, killed (by its own handle) when the test ends, pass or
/// fail.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Takes fd 3 of the process given as argument with `pidfd_getfd` (what the kernel allows a
/// process of the same uid, and no other unprivileged one) and says which port it serves,
/// or the errno.
const TAKE_FD3: &str = r#"
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(int(sys.argv[1]))
fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd (x86_64)
if fd < 0:
    print(f"refused errno={ctypes.get_errno()}")
else:
    print(f"took port={socket.socket(fileno=fd).getsockname()[1]}")
"#;

/// Runs [`TAKE_FD3`] against `pid` as uid and gid `id`, with no supplementary group.
fn take_fd3_as(id: u32, pid: u32) -> String {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", TAKE_FD3, &pid.to_string()])
        .uid(id)
        .gid(id)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The uid a process runs with (real, effective, saved and file-system uids all equal).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|&u| u == uids[0]), "{uids:?}");
    uids[0]
}

/// With `--user dynamic` each group's handlers run as a uid of their own, so code in one
/// group's handler cannot take another group's socket (`pidfd_getfd`, or ptrace); with one
/// named user for both groups it can (the control). A group whose uid is in use is refused.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn with_dynamic_users_a_handler_cannot_take_another_groups_socket() {
    privileged(Needs::program().and_python(), || {
        use parsrv::spec::dynamic_user;
        let start = |name: &str, listen: &str, user: &str| {
            let spawner = group(name, HandlerKind::Exec)
                .listen(listen)
                .handlers(1)
                .with(|g| g.user = Some(user.into()))
                .command(&["sleep", "600"])
                .start();
            let pid = spawner.status().handlers[0].pid.unwrap();
            // Until `sleep` runs (blocked in clock_nanosleep, x86_64 syscall 230), the
            // process is parsrv's, which the kernel keeps from its new uid (not dumpable).
            assert!(wait_for(Duration::from_secs(10), || {
                std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                    .is_ok_and(|call| call.split(' ').next() == Some("230"))
            }));
            (spawner, pid)
        };
        let (web, web_pid) = start("dyn-web", "127.0.0.1:8080", "dynamic");
        let (api, api_pid) = start("dyn-api", "127.0.0.1:8081", "dynamic");
        let (shared, shared_pid) = start("shared-user", "127.0.0.1:8082", "nobody:nogroup");
        let (web_uid, api_uid) = (uid_of(web_pid), uid_of(api_pid));
        assert_eq!(web_uid, dynamic_user::credentials_of("dyn-web").uid);
        assert_eq!(api_uid, dynamic_user::credentials_of("dyn-api").uid);
        assert_ne!(web_uid, api_uid);
        for uid in [web_uid, api_uid] {
            assert!((dynamic_user::FIRST..=dynamic_user::LAST).contains(&uid));
            assert!(nix::unistd::User::from_uid(uid.into()).unwrap().is_none());
        }
        // The attack: code of web's handler (its uid) takes api's socket.
        assert_eq!(take_fd3_as(web_uid, api_pid), "refused errno=1");
        // Controls: api's own uid takes it, and with a named user shared by groups any
        // process of that user (another group's handler) takes that socket.
        assert_eq!(take_fd3_as(api_uid, api_pid), "took port=8081");
        assert_eq!(take_fd3_as(65534, shared_pid), "took port=8082");

        // A group whose uid a process already has is refused, in one line naming it, and
        // leaves nothing behind.
        let taken = dynamic_user::credentials_of("dyn-taken");
        let _squatter = KilledOnDrop(
            Command::new("sleep")
                .arg("60")
                .uid(taken.uid)
                .gid(taken.gid)
                .spawn()
                .unwrap(),
        );
        let refused = group("dyn-taken", HandlerKind::Http)
            .listen("127.0.0.1:8083")
            .with(|g| g.user = Some("dynamic".into()));
        let out = Command::new(parsrv_integration_tests::parsrv_bin())
            .arg("run")
            .args(refused.args())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("uid {} is in use by pid", taken.uid))
                && stderr.contains("(sleep)")
                && stderr.contains("rename the group"),
            "{stderr}"
        );
        assert!(!parsrv::dataplane::pins::group_dir("dyn-taken").exists());
        assert!(!parsrv::run_dir::run_dir().join("dyn-taken.json").exists());
        for spawner in [web, api, shared] {
            assert!(spawner.stop().success());
        }
    });
}

/// Takes fd 3 of `pid` (root's `pidfd_getfd`, standing for any process outside the handlers'
/// seccomp filter that got hold of a group socket).
fn take_fd3(pid: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; each returned fd is checked, then owned.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 3, 0);
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd as i32)
    }
}

/// setsockopt(SOL_SOCKET, `option`) on `socket` with `value`: what the kernel said.
fn set_socket_option<T>(
    socket: &std::os::fd::OwnedFd,
    option: i32,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` is a live T of the size given.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Someone outside the handlers' seccomp filter who holds a group socket (here root, with a
/// handler's fd 3) detaches the group's program, then puts a classic BPF selector in its
/// place: the kernel lets them both times, and each time the watchdog, which reads the
/// group's program from the kernel (the `iter/tcp` audit iterator), attaches the group's
/// program again within a few seconds, counts it and says it; afterwards the program decides
/// every connection again.
#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn the_watchdog_attaches_the_groups_program_again_when_someone_takes_it_away() {
    privileged(
        Needs::program().and(parsrv_integration_tests::Feature::TcpIter),
        || {
            let spawner = group("test-audited", HandlerKind::Echo).handlers(2).start();
            let pid = spawner.status().handlers[0].pid.unwrap();
            let socket = take_fd3(pid);
            let selected = || -> u64 {
                spawner
                    .status()
                    .sockets
                    .iter()
                    .map(|s| s.counters.selected)
                    .sum()
            };
            let ret_0 = [libc::sock_filter {
                code: 0x06, // BPF_RET | BPF_K: always socket 0
                jt: 0,
                jf: 0,
                k: 0,
            }];
            let classic = libc::sock_fprog {
                len: 1,
                filter: ret_0.as_ptr() as *mut libc::sock_filter,
            };
            for (round, attack) in ["detach", "classic BPF"].into_iter().enumerate() {
                let audited = spawner.status().audit;
                assert_eq!(audited.restored, round as u64, "{audited:?}");
                assert_eq!(audited.unavailable, None, "{}", spawner.log());
                match attack {
                    "detach" => set_socket_option(&socket, libc::SO_DETACH_REUSEPORT_BPF, &0i32),
                    _ => set_socket_option(&socket, libc::SO_ATTACH_REUSEPORT_CBPF, &classic),
                }
                .unwrap_or_else(|e| panic!("{attack}: the kernel refused it: {e}"));
                assert!(
                    wait_for(Duration::from_secs(20), || spawner.status().audit.restored
                        == round as u64 + 1),
                    "{attack}: not restored: {:?}\n{}",
                    spawner.status().audit,
                    spawner.log()
                );
                let audited = spawner.status().audit;
                assert!(audited.checks > 0);
                assert!(
                    audited.last_restored.as_deref().is_some_and(
                        |l| l == format!("{}: ran no program, or a classic BPF one", addr())
                    ),
                    "{audited:?}"
                );
                assert!(
                    spawner.log().contains("attached the group's again"),
                    "{}",
                    spawner.log()
                );
                let before = selected();
                let connections = 20;
                for _ in 0..connections {
                    assert!(echo_once(Duration::from_secs(5)));
                }
                assert_eq!(selected() - before, connections, "{attack}");
            }
            // Nothing else was restored since: the program the group runs is its own.
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(spawner.status().audit.restored, 2);
            drop(socket);
            assert!(spawner.stop().success());
        },
    );
}
