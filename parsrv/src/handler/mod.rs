//! Handler processes. The spawner starts each with `parsrv handler` ([`Launch`]): it drops
//! privileges if asked, then runs a built-in handler ([`builtin`]: `echo`, `http`) or execs
//! the group's program with the socket-activation protocol. Built-in handlers keep counters
//! in a page shared with the spawner ([`stats`]).

mod builtin;
pub mod containment;
mod stats;

pub use builtin::serve_http_connection;
pub use stats::{HandlerStats, SharedStats};

use std::os::fd::RawFd;

use crate::spec::{Credentials, HandlerKind};

/// The handler's socket (as in systemd socket activation, SD_LISTEN_FDS_START).
pub const LISTEN_FD: RawFd = crate::activation::FIRST_FD;
/// The shared [`HandlerStats`] page of a built-in handler (exec handlers get none).
pub const STATS_FD: RawFd = 4;
/// The read end of the pipe the handler's stdout and stderr go to. The handler never reads
/// it: holding it keeps its own writes from failing (EPIPE, SIGPIPE) while no spawner
/// runs, and a spawner that adopts the handler takes a copy of it to forward the output
/// again. (What is written meanwhile waits in the pipe, up to its size.)
pub const OUTPUT_FD: RawFd = 5;

/// What a handler process is told by its spawner: the arguments of the hidden `parsrv
/// handler` command. The spawner writes them with [`Launch::to_args`] and the handler parses
/// them with clap, from this one declaration.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Launch {
    #[arg(long, value_enum)]
    pub kind: HandlerKind,
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
    #[arg(long, default_value = "")]
    pub group: String,
    /// Who to become before serving.
    #[arg(long, value_parser = credentials_value)]
    pub credentials: Option<Credentials>,
    /// For exec handlers: the program and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl Launch {
    /// The arguments after `parsrv handler` that parse back to this launch.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--kind={}", self.kind),
            format!("--threads={}", self.threads),
            format!("--slot={}", self.slot),
            format!("--group={}", self.group),
        ];
        if let Some(Credentials { uid, gid }) = self.credentials {
            args.push(format!("--credentials={uid}:{gid}"));
        }
        if !self.command.is_empty() {
            args.push("--".into());
            args.extend(self.command.iter().cloned());
        }
        args
    }
}

/// `UID:GID`, as [`Launch::to_args`] writes it.
fn credentials_value(value: &str) -> Result<Credentials, String> {
    let (uid, gid) = value.split_once(':').ok_or("expected UID:GID")?;
    Ok(Credentials {
        uid: uid.parse().map_err(|_| "bad uid")?,
        gid: gid.parse().map_err(|_| "bad gid")?,
    })
}

/// Becomes the handler: drops privileges if asked, then runs a built-in handler or execs
/// the command (returning only if that fails).
pub fn launch(launch: Launch) -> anyhow::Result<()> {
    let filter = containment::filter()?;
    if let Some(credentials) = launch.credentials {
        // While still root: afterwards it takes the capability it removes.
        containment::drop_bounding_set()?;
        drop_privileges(credentials)?;
    }
    containment::contain(&filter)?;
    match launch.kind {
        HandlerKind::Exec => Err(exec_command(&launch)),
        kind => builtin::run(kind, launch.threads, launch.slot),
    }
}

/// Becomes `credentials` for good, with no capabilities left.
fn drop_privileges(credentials: Credentials) -> anyhow::Result<()> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    let gid = Gid::from_raw(credentials.gid);
    setgroups(&[gid])?;
    setgid(gid)?;
    setuid(Uid::from_raw(credentials.uid))?;
    // Leaving uid 0 clears the capability sets (no SECBIT_KEEP_CAPS); check rather than trust.
    let effective = crate::procfs::effective_capabilities()?;
    if credentials.uid != 0 && effective != 0 {
        anyhow::bail!(
            "capabilities survived the switch to uid {}",
            credentials.uid
        );
    }
    Ok(())
}

/// Whether process `pid` shows that parsrv started it as slot `slot`'s handler of `group`:
/// its command line (`parsrv handler ... --slot=N --group=G`, until it execs a command)
/// or the environment parsrv gave the command it execs (LISTEN_PID of itself,
/// PARSRV_GROUP, PARSRV_SLOT). A spawner signals a process a record names only if it
/// does: the record could name any process, and root can signal all of them. (A process
/// that fakes these is its owner's own, whom it could signal anyway.)
pub fn shows_it_is(pid: u32, group: &str, slot: usize) -> bool {
    let args = crate::procfs::cmdline(pid);
    let has_arg = |arg: &[u8]| args.iter().any(|a| a == arg);
    let slot_arg = format!("--slot={slot}");
    let group_arg = format!("--group={group}");
    if args.get(1).is_some_and(|a| a == b"handler")
        && has_arg(slot_arg.as_bytes())
        && has_arg(group_arg.as_bytes())
    {
        return true;
    }
    let variables = crate::procfs::environ(pid);
    let has = |name: &str, value: &str| {
        let variable = format!("{name}={value}");
        variables.iter().any(|v| v == variable.as_bytes())
    };
    use crate::activation::{GROUP_ENV, LISTEN_PID, SLOT_ENV};
    has(LISTEN_PID, &pid.to_string()) && has(GROUP_ENV, group) && has(SLOT_ENV, &slot.to_string())
}

/// Execs the handler's command with the socket-activation variables set for this very
/// process (exec keeps the pid). Returns only on failure.
fn exec_command(launch: &Launch) -> anyhow::Error {
    use crate::activation::{LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID};
    use std::os::unix::process::CommandExt;
    let program = &launch.command[0];
    // Single-threaded here: setting the environment is safe.
    std::env::set_var(LISTEN_FDS, "1");
    std::env::set_var(LISTEN_PID, std::process::id().to_string());
    std::env::set_var(LISTEN_FDNAMES, &launch.group);
    std::env::set_var(crate::activation::THREADS_ENV, launch.threads.to_string());
    std::env::set_var(crate::activation::SLOT_ENV, launch.slot.to_string());
    std::env::set_var(crate::activation::GROUP_ENV, &launch.group);
    let error = std::process::Command::new(program)
        .args(&launch.command[1..])
        .exec();
    anyhow::anyhow!("cannot run {program}: {error}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_shows_it_is_a_handler_by_the_environment_parsrv_gave_it() {
        let mut handler = std::process::Command::new("sh")
            .args([
                "-c",
                "exec env LISTEN_PID=$$ PARSRV_GROUP=web PARSRV_SLOT=1 sleep 30",
            ])
            .spawn()
            .unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = handler.id();
        // Until sh and env have exec'd sleep.
        let shown = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            shows_it_is(pid, "web", 1)
        });
        assert!(shown);
        assert!(!shows_it_is(pid, "web", 2));
        assert!(!shows_it_is(pid, "api", 1));
        assert!(!shows_it_is(other.id(), "web", 1));
        for child in [&mut handler, &mut other] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    use super::*;

    #[test]
    fn launch_arguments_parse_back_to_the_same_launch() {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Handler {
            #[command(flatten)]
            launch: Launch,
        }
        let mut launch = Launch {
            kind: HandlerKind::Exec,
            threads: 3,
            slot: 7,
            group: "web-1".into(),
            credentials: Some(Credentials {
                uid: 65534,
                gid: 100,
            }),
            command: vec!["sh".into(), "-c".into(), "exec --odd --flags".into()],
        };
        for _ in 0..2 {
            let argv = std::iter::once("handler".to_owned()).chain(launch.to_args());
            let matches = <Handler as clap::CommandFactory>::command().get_matches_from(argv);
            assert_eq!(Handler::from_arg_matches(&matches).unwrap().launch, launch);
            (launch.credentials, launch.command, launch.kind) = (None, vec![], HandlerKind::Http);
        }
    }
}
