//! The docs' shell blocks that start a group, run as written (`parsrv/tests/docs_commands.rs`
//! only parses every command): each `parsrv run` of a block starts and answers HTTP on the
//! first and the last address of every `--listen` entry, every other `parsrv` command of the
//! block exits 0 against the group started before it, and SIGTERM stops each group leaving
//! no handler behind. So a README example that cannot start, a group name the docs derive
//! wrongly, or a handler command that no longer works breaks the suite.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use parsrv::cli::Cli;
use parsrv_integration_tests::{
    apps_dir,
    docs::{blocks, pages, parsrv_commands, root},
    example, parsrv_bin, privileged, pyenv, wait_for, Feature, Needs, Spawner,
};

/// The handler programs the docs name, where the suite has them: the pinned gunicorn and
/// uvicorn in the test virtualenv, the example handlers beside the parsrv under test.
fn installed(program: &str) -> PathBuf {
    match program {
        "gunicorn" | "uvicorn" => pyenv().join("bin").join(program),
        _ => match program.strip_prefix("target/debug/examples/") {
            Some(name) => example(name),
            None => PathBuf::from(program),
        },
    }
}

/// An HTTP answer from `addr` (a wildcard address is asked on loopback).
fn answers_http(addr: SocketAddr) -> Result<String, String> {
    let addr = match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        _ => addr,
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: docs\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    // Bounded: an answer is a status line and a greeting.
    let _ = stream.take(64 << 10).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    match answer.starts_with("HTTP/1.") && answer.contains(" 200 ") {
        true => Ok(answer),
        false => Err(format!("{addr}: {answer:?}")),
    }
}

/// A `parsrv run` line of the docs, started as written from the workspace's root.
/// Whether a UDP echo group at `addr` sends a datagram back.
fn answers_udp(addr: SocketAddr) -> Result<String, String> {
    let client = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    client.send_to(b"docs", addr).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 8];
    match client.recv(&mut buf) {
        Ok(4) if &buf[..4] == b"docs" => Ok("docs".into()),
        Ok(len) => Err(format!("answered {:?}", &buf[..len])),
        Err(e) => Err(e.to_string()),
    }
}

/// Where a started group is probed: its address, and whether it is UDP (an echo group,
/// asked with a datagram) or TCP (asked with an HTTP request).
type Probe = (SocketAddr, bool);

fn start(argv: &[String], line: &str) -> Result<(Spawner, Vec<Probe>), String> {
    let spec = Cli::try_parse_group(argv.to_vec()).map_err(|e| format!("{line}: {e}"))?;
    let mut args: Vec<String> = argv[1..].to_vec();
    if let Some(dashes) = args.iter().position(|a| a == "--") {
        if let Some(program) = args.get_mut(dashes + 1) {
            *program = installed(program).display().to_string();
        }
    }
    let mut command = Command::new(parsrv_bin());
    command.args(&args).current_dir(root());
    let spawner = Spawner::start_command("docs", &spec.name, command);
    // The first and the last address of every entry: a prefix's other addresses are
    // nobody's, and reach the group through the lookup program.
    let probes = spec
        .listen
        .iter()
        .flat_map(|l| {
            let udp = l.transport == parsrv::spec::Transport::Udp;
            [
                (l.bind_addr(), udp),
                (SocketAddr::new(l.last_addr(), l.last_port), udp),
            ]
        })
        .collect();
    Ok((spawner, probes))
}

/// Stops a group a block started, with SIGTERM as an operator would: it must exit 0 and
/// leave none of its handlers behind.
fn stop(spawner: Spawner, pids: Vec<u32>) -> Result<(), String> {
    let log_path = spawner.log_path();
    let status = spawner.stop();
    if !status.success() {
        return Err(format!(
            "SIGTERM: {status}\n{}",
            std::fs::read_to_string(log_path).unwrap_or_default()
        ));
    }
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    match left.is_empty() {
        true => Ok(()),
        false => Err(format!("handlers left after a clean stop: {left:?}")),
    }
}

/// Runs one block. A block may show alternatives (gunicorn, then uvicorn, on one address),
/// so each `parsrv run` serves until the next one or the block's end, and the other `parsrv`
/// commands run against the group started last. Returns how many commands ran.
fn run_block(block: &str) -> Result<usize, String> {
    let mut running: Option<(Spawner, Vec<u32>)> = None;
    let mut ran = 0;
    for argv in parsrv_commands(block) {
        let line = argv.join(" ");
        ran += 1;
        if argv.get(1).map(String::as_str) == Some("run") {
            if let Some((spawner, pids)) = running.take() {
                stop(spawner, pids)?;
            }
            let (spawner, probes) = start(&argv, &line)?;
            for (addr, udp) in probes {
                // A Python server takes a moment to import its app after it is up.
                let mut last = Err(String::new());
                wait_for(Duration::from_secs(30), || {
                    last = if udp {
                        answers_udp(addr)
                    } else {
                        answers_http(addr)
                    };
                    last.is_ok()
                });
                last.map_err(|e| format!("{line}: no answer: {e}\n{}", spawner.log()))?;
            }
            let pids = spawner
                .status()
                .handlers
                .iter()
                .filter_map(|h| h.pid)
                .collect();
            running = Some((spawner, pids));
        } else {
            let out = Command::new(parsrv_bin())
                .args(&argv[1..])
                .current_dir(root())
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(format!(
                    "{line}: {}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    if let Some((spawner, pids)) = running {
        stop(spawner, pids)?;
    }
    Ok(ran)
}

#[test]
#[ignore = "privileged: run as root with `cargo xtask test`"]
fn every_docs_block_that_starts_a_group_runs_as_written() {
    let needs = Needs::program()
        .and(Feature::SkLookup)
        .and_python()
        .host_only("checks that the docs' commands run as written; what they do in the kernel is the other tests' (20x slower under emulation: 76 s of a VM for 4 s here)");
    privileged(needs, || {
        assert!(apps_dir().exists());
        let mut blocks_run = 0;
        let mut commands = 0;
        let mut wrong = Vec::new();
        for page in pages() {
            let text = std::fs::read_to_string(&page).unwrap();
            for (line, block) in blocks(&text, "sh") {
                let starts_a_group = parsrv_commands(&block)
                    .iter()
                    .any(|argv| argv.get(1).map(String::as_str) == Some("run"));
                if !starts_a_group {
                    continue;
                }
                blocks_run += 1;
                match run_block(&block) {
                    Ok(ran) => commands += ran,
                    Err(e) => wrong.push(format!("{} (block at line {line}): {e}", page.display())),
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "docs blocks that do not run as written:\n{}",
            wrong.join("\n")
        );
        // The README's first group, the handlers page and the addresses page at least.
        assert!(blocks_run >= 4, "only {blocks_run} blocks start a group");
        eprintln!("{blocks_run} docs blocks, {commands} parsrv commands, ran as written");
    });
}
