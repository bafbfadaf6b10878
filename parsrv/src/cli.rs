//! The `parsrv` command line.

use std::{io::IsTerminal, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{self, GroupSpec, HandlerKind, Policy, WhenFull},
    control::{self, Request, Response},
    error::{Error, Result, EXIT_RUNTIME, EXIT_USAGE},
    handler,
    spawner::{self, RunOptions},
};

#[derive(Debug, Parser)]
#[command(
    name = "parsrv",
    version,
    about = "Many handler processes serve one port in parallel; an eBPF program steers each new \
             connection, in the kernel, to a handler socket whose accept queue has room."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a socket group, attach the steering program and run its handlers (as root).
    Run(RunArgs),
    /// Show a running group: handlers, exact accept-queue depths, counters.
    Status(StatusArgs),
    /// Change a running group.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Run one built-in handler on the socket inherited as fd 3 (started by `parsrv run`).
    #[command(hide = true)]
    Handler(HandlerArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address and port every handler socket binds, e.g. 127.0.0.1:8080 or [::1]:8080.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// Handler processes, one socket each (1 to 128): a count, or MIN..MAX to grow and
    /// shrink with load.
    #[arg(long, default_value = "4", value_name = "N|MIN..MAX")]
    pub handlers: String,
    /// Accept-queue length of each socket (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 128, value_name = "B")]
    pub backlog: u32,
    /// What each handler runs: a built-in server, or `exec` and a program after `--`.
    #[arg(long, value_enum)]
    pub handler: HandlerKind,
    /// Threads accepting in parallel on each handler's socket (exec handlers get it as
    /// PARSRV_THREADS).
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: u32,
    /// Where a new connection goes while some socket has room.
    #[arg(long, value_enum, default_value_t)]
    pub policy: Policy,
    /// What happens when every socket is full.
    #[arg(long = "when-full", value_enum, default_value_t)]
    pub when_full: WhenFull,
    /// Group name for pins and `parsrv status` [default: ADDR-PORT].
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds a handler may take to exit after SIGTERM before SIGKILL (and a drain).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub grace: f64,
    /// Seconds a replacement handler may take to become ready in a restart.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub ready_timeout: f64,
    /// On SIGINT/SIGTERM, refuse new connections (RST) and let the queued ones be served
    /// (at most --grace) before stopping the handlers.
    #[arg(long)]
    pub drain: bool,
    /// With --handlers MIN..MAX: change the size only by `parsrv group resize`, not with load.
    #[arg(long)]
    pub no_autoscale: bool,
    /// Pin handlers to these CPUs, round-robin by slot: `0-3`, `0,2`.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Run handlers as this user (and group), without capabilities.
    #[arg(long, value_name = "NAME[:GROUP]")]
    pub user: Option<String>,
    /// With --handler exec: the program each handler runs, and its arguments. It gets its
    /// socket as fd 3 with LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES (socket activation).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl RunArgs {
    pub fn into_options(self) -> Result<RunOptions> {
        let listen = config::parse_listen(&self.listen)?;
        let (handlers, handlers_max) = config::parse_handlers(&self.handlers)?;
        let seconds = |option: &'static str, value: f64| {
            if value.is_finite() && (0.0..=3600.0).contains(&value) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(Error::InvalidOption {
                    option,
                    value: value.to_string(),
                    reason: "must be 0 to 3600 seconds".into(),
                })
            }
        };
        let grace = seconds("--grace", self.grace)?;
        let ready_timeout = seconds("--ready-timeout", self.ready_timeout)?;
        let spec = GroupSpec {
            name: self
                .name
                .unwrap_or_else(|| GroupSpec::default_name(&listen)),
            listen,
            handlers,
            handlers_max,
            autoscale: !self.no_autoscale,
            backlog: self.backlog,
            handler: self.handler,
            threads: self.threads,
            policy: self.policy,
            when_full: self.when_full,
            command: self.command,
            cpus: self
                .cpus
                .as_deref()
                .map(config::parse_cpus)
                .transpose()?
                .unwrap_or_default(),
            user: self.user,
        };
        spec.validate()?;
        Ok(RunOptions {
            spec,
            grace,
            ready_timeout,
            drain: self.drain,
        })
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The group (see `parsrv run --name`); may be left out when only one runs.
    pub group: Option<String>,
    /// Print the stable JSON form (schema in the README) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Grow or shrink a running group to N handlers (within the MIN..MAX it was started
    /// with), losing no connection: removed sockets' queues migrate to the others.
    Resize {
        /// The group (see `parsrv status`).
        group: String,
        /// Handlers to run.
        handlers: u32,
    },
    /// Replace every handler of a running group, one at a time, with no failed or reset
    /// connection (e.g. after the handler's program changed on disk).
    Restart {
        /// The group (see `parsrv status`).
        group: String,
    },
}

/// How the spawner starts a handler process (not for people).
#[derive(Debug, Args)]
pub struct HandlerArgs {
    #[arg(long, value_enum)]
    pub kind: HandlerKind,
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
    #[arg(long, default_value = "")]
    pub group: String,
    #[arg(long)]
    pub spawner: u32,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long, requires = "uid")]
    pub gid: Option<u32>,
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl HandlerArgs {
    fn into_launch(self) -> handler::Launch {
        handler::Launch {
            kind: self.kind,
            threads: self.threads,
            slot: self.slot,
            group: self.group,
            spawner: self.spawner,
            credentials: self.uid.map(|uid| config::Credentials {
                uid,
                gid: self.gid.unwrap_or(uid),
            }),
            command: self.command,
        }
    }
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(&cli.command);
    let result = match cli.command {
        Command::Run(args) => args.into_options().and_then(spawner::run),
        Command::Status(args) => status(args),
        Command::Group(command) => group(command),
        Command::Handler(args) => {
            return match handler::launch(args.into_launch()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("parsrv handler: {e:#}");
                    EXIT_RUNTIME
                }
            }
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("parsrv: {e}");
            e.exit_code()
        }
    }
}

/// clap's own errors, on one line (help and --version print as usual).
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            EXIT_USAGE
        } else {
            0
        };
    }
    let rendered = e.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    // Keep clap's list of accepted values and its suggestions, on the same line.
    let hints: Vec<&str> = lines
        .filter(|l| l.starts_with('[') || l.starts_with("tip:"))
        .collect();
    if hints.is_empty() {
        eprintln!("parsrv: {first} (see parsrv --help)");
    } else {
        eprintln!("parsrv: {first} {} (see parsrv --help)", hints.join(" "));
    }
    EXIT_USAGE
}

fn init_logging(command: &Command) {
    use std::io::Write;
    // A handler's output goes through its spawner, which prefixes it with slot and pid.
    let who = match command {
        Command::Handler(_) => String::new(),
        _ => format!("parsrv[{}] ", std::process::id()),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| writeln!(buf, "{who}{}: {}", record.level(), record.args()))
        .init();
}

fn group(command: GroupCommand) -> Result<()> {
    let (group, request) = match command {
        GroupCommand::Resize { group, handlers } => (group, Request::Resize { handlers }),
        GroupCommand::Restart { group } => (group, Request::Restart),
    };
    let group = control::resolve_group(Some(&group))?;
    match control::request(&group, &request)? {
        Response::Done(message) => {
            println!("{message}");
            Ok(())
        }
        Response::Rejected(message) => Err(Error::Rejected(message)),
        Response::Error(message) => Err(Error::Spawner { group, message }),
        Response::Status(_) => Err(Error::Spawner {
            group,
            message: "answered with a status".into(),
        }),
    }
}

fn status(args: StatusArgs) -> Result<()> {
    let group = control::resolve_group(args.group.as_deref())?;
    match control::request(&group, &Request::Status)? {
        Response::Status(status) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("serializable")
                );
            } else {
                print!("{}", status.render());
                if std::io::stdout().is_terminal() {
                    println!("(JSON: parsrv status {group} --json)");
                }
            }
            Ok(())
        }
        Response::Error(message) | Response::Rejected(message) | Response::Done(message) => {
            Err(Error::Spawner { group, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunOptions> {
        let mut argv = vec!["parsrv", "run", "--listen", "127.0.0.1:8080"];
        if !extra.contains(&"--handler") {
            argv.extend(["--handler", "echo"]);
        }
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => args.into_options(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_sane() {
        let options = run_args(&[]).unwrap();
        assert_eq!((options.spec.handlers, options.spec.handlers_max), (4, 4));
        assert!(!options.drain);
        assert_eq!(options.ready_timeout, Duration::from_secs(10));
        assert_eq!(options.spec.threads, 1);
        assert_eq!(options.spec.policy, Policy::Redirect);
        assert_eq!(options.spec.when_full, WhenFull::Drop);
        assert_eq!(options.spec.name, "127_0_0_1-8080");
        assert_eq!(options.grace, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for extra in [
            &["--handlers", "0"][..],
            &["--handlers", "129"],
            &["--handlers", "4..2"],
            &["--handlers", "1..x"],
            &["--ready-timeout=-1"],
            &["--backlog", "0"],
            &["--threads", "0"],
            &["--grace=-1"],
            &["--name", "../x"],
        ] {
            let err = run_args(extra).unwrap_err();
            assert_eq!(err.exit_code(), EXIT_USAGE, "{extra:?}: {err}");
            assert!(
                err.to_string()
                    .contains(extra[0].split('=').next().unwrap()),
                "{extra:?}: {err}"
            );
        }
    }

    #[test]
    fn exec_command_cpus_and_user_parse() {
        let options = run_args(&[
            "--handler",
            "exec",
            "--cpus",
            "0",
            "--user",
            "root",
            "--",
            "sh",
            "-c",
            "exec true",
        ])
        .unwrap();
        assert_eq!(options.spec.handler, HandlerKind::Exec);
        assert_eq!(options.spec.command, ["sh", "-c", "exec true"]);
        assert_eq!(options.spec.cpus, [0]);
        assert_eq!(options.spec.user.as_deref(), Some("root"));
        let err = run_args(&["--cpus", "x"]).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn handler_ranges_and_drain_parse() {
        let options = run_args(&["--handlers", "2..6", "--drain"]).unwrap();
        assert_eq!((options.spec.handlers, options.spec.handlers_max), (2, 6));
        assert!(options.drain && options.spec.autoscaled());
        let cli = Cli::try_parse_from(["parsrv", "group", "resize", "web", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Group(GroupCommand::Resize { handlers: 3, .. })
        ));
    }

    #[test]
    fn policy_and_when_full_flags_parse() {
        let options = run_args(&["--policy", "least-loaded", "--when-full", "refuse"]).unwrap();
        assert_eq!(options.spec.policy, Policy::LeastLoaded);
        assert_eq!(options.spec.when_full, WhenFull::Refuse);
        assert!(Cli::try_parse_from([
            "parsrv",
            "run",
            "--listen",
            "1.2.3.4:5",
            "--handler",
            "ftp"
        ])
        .is_err());
    }
}
