//! The `parsrv` command line.

use std::{io::IsTerminal, time::Duration};

use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::{
    config_file::ConfigFile,
    control::{self, Request, Response},
    error::{Error, Result, EXIT_RUNTIME, EXIT_USAGE},
    handler,
    output::ERROR_PREFIX,
    spawner::{self, RunOptions},
    spec::{self, GroupSpec},
    status::GroupStatus,
};

#[derive(Debug, Parser)]
#[command(
    name = "parsrv",
    version,
    long_version = crate::build_info::LONG_VERSION,
    about = "Many handler processes serve one port in parallel; an eBPF program steers each new \
             connection, in the kernel, to a handler socket whose accept queue has room."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `parsrv run FLAGS...` (`argv` with the program name) into the group the flags
    /// define: how a config file's keys are read.
    pub fn try_parse_group(argv: Vec<String>) -> std::result::Result<GroupSpec, clap::Error> {
        match Cli::try_parse_from(argv)?.command {
            Command::Run(RunArgs {
                group: Some(spec), ..
            }) => Ok(spec.named()),
            _ => Err(clap::Error::new(
                clap::error::ErrorKind::MissingRequiredArgument,
            )),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create socket groups (flags: one; --config FILE: any number), attach the steering
    /// program and run their handlers (as root).
    Run(RunArgs),
    /// Run the benchmark suite (the parsrv-bench binary built beside this one; as root).
    Bench {
        /// Scenarios and options, as for `cargo xtask bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check a config file without touching the kernel: every problem, with line and column.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show a running group: handlers, exact accept-queue depths, counters.
    Status(StatusArgs),
    /// Show which kernel features parsrv needs and whether this kernel has them; exits 1
    /// when one is missing.
    Kernel {
        #[arg(long)]
        json: bool,
    },
    /// Change a running group.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List the clients of a group with client affinity: each client (its address cut to
    /// the group's prefix), the slot and handler its connections go to, and since when.
    Affinity {
        group: String,
        /// Only this client (any address of it: it is cut to the prefix).
        client: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a group and remove everything it has: through its spawner if one answers (as
    /// `group remove`), otherwise (its spawner died and its handlers serve on) by taking it
    /// over and stopping it.
    Stop { group: String },
    /// Replace a running spawner by the parsrv binary now at its path (install the new one
    /// there first): the same process executes it, and the new image adopts every group;
    /// handlers and connections are not touched.
    Upgrade {
        /// The spawner (its pid, see `parsrv group list`); may be left out when one runs.
        #[arg(long, value_name = "PID")]
        spawner: Option<u32>,
    },
    /// Run this host's part of a cluster of hosts behind ECMP (the config file's
    /// `[cluster]`), and look at it.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run one built-in handler on the socket inherited as fd 3 (started by `parsrv run`).
    #[command(hide = true)]
    Handler(handler::Launch),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Run the agent (as root): load and attach the host dispatcher, keep the dispatch table
    /// in step with the peers. Until SIGTERM or SIGINT, which withdraw the host and detach
    /// the dispatcher.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// This host, its peers, the dispatch table and the dispatcher's counters.
    Status {
        /// The cluster (`name` in `[cluster]`).
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new clients (runs the `draining` command, which withdraws the route);
    /// the clients this host serves stay.
    Drain { name: String },
    /// Make the cluster's CA (unless DIR has one) and a key and certificate per host, for
    /// the peers' mutual TLS (`tls = { ca, cert, key }` in `[cluster]`). Keys are 0600;
    /// nothing existing is overwritten, so a host added later gets one of the same CA.
    Certs {
        /// The cluster (`name` in `[cluster]`): certificates name `host-ID.NAME.parsrv`.
        #[arg(long)]
        name: String,
        /// The host ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<u16>,
        /// Where to write them (created 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run the groups of this TOML file (see docs/cli.md) instead of one from flags; SIGHUP
    /// reads it again.
    #[arg(long, value_name = "FILE", conflicts_with = "GroupSpec")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics of every group at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// The group, when not from --config.
    #[command(flatten)]
    pub group: Option<GroupSpec>,
}

impl RunArgs {
    pub fn into_options(self) -> Result<RunOptions> {
        let metrics = self
            .metrics
            .as_deref()
            .map(spec::parse_listen)
            .transpose()
            .map_err(|_| Error::InvalidOption {
                option: "--metrics",
                value: self.metrics.clone().unwrap_or_default(),
                reason: "expected ADDR:PORT, e.g. 127.0.0.1:9100".into(),
            })?;
        if let Some(path) = self.config {
            let file = ConfigFile::load(&path)?;
            return Ok(RunOptions {
                groups: file.groups,
                metrics: metrics.or(file.metrics),
                config: Some(path),
            });
        }
        let Some(spec) = self.group else {
            unreachable!("clap requires --listen and --handler without --config");
        };
        let spec = spec.named();
        spec.validate()?;
        Ok(RunOptions {
            groups: vec![spec],
            metrics,
            config: None,
        })
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The group (see `parsrv run --name`); without it, every running group.
    pub group: Option<String>,
    /// Print the stable JSON form (schema in docs/cli.md) instead of a table: one object
    /// for a named group, an array for all.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Show it again every --interval, with rates per second.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two --watch updates.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub interval: f64,
    /// With --watch: stop after this many updates.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Start groups in a running spawner: from a config file (--config) or flags as for
    /// `parsrv run`. All or none: a group that fails leaves the spawner as it was.
    Add {
        /// The spawner (its pid, see `parsrv group list`); may be left out when one runs.
        #[arg(long, value_name = "PID")]
        spawner: Option<u32>,
        #[command(flatten)]
        group: Box<RunArgs>,
    },
    /// Stop a group gracefully (draining it if it was started with drain) and remove it.
    Remove { group: String },
    /// The running groups, with their spawners.
    List,
    /// A running group's settings, as a config file would give them.
    Show { group: String },
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

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    crate::output::init_logging(matches!(cli.command, Command::Handler(_)));
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Handler(_) | Command::Cluster(ClusterCommand::Run { .. })
    ) {
        // A query piped into `head` ends quietly when the reader goes, as other Unix tools
        // do (Rust ignores SIGPIPE, which would turn that into a panic). The spawner and
        // handlers keep ignoring it: a closed log pipe must not kill them.
        // SAFETY: setting a signal's disposition to its default, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run(args) => args.into_options().and_then(spawner::run),
        Command::Status(args) => status(args),
        Command::Check { config } => check(&config),
        Command::Kernel { json } => kernel_features(json),
        Command::Bench { args } => bench(&args),
        Command::Group(command) => group(command),
        Command::Stop { group } => stop(&group),
        Command::Affinity {
            group,
            client,
            json,
        } => affinity(&group, client, json),
        Command::Upgrade { spawner } => upgrade(spawner),
        Command::Cluster(command) => cluster(command),
        Command::Handler(args) => {
            return match handler::launch(args) {
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
            eprintln!("{ERROR_PREFIX}{e}");
            e.exit_code()
        }
    }
}

fn cluster(command: ClusterCommand) -> Result<()> {
    use crate::cluster;
    match command {
        ClusterCommand::Run { config } => {
            let file = ConfigFile::load(&config)?;
            let spec = file.cluster.ok_or_else(|| {
                Error::Rejected(format!(
                    "{} has no [cluster] section: add one (see docs/cluster.md)",
                    config.display()
                ))
            })?;
            cluster::run(spec)
        }
        ClusterCommand::Status { name, json } => {
            let status = cluster::status(&name)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("serializable")
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        ClusterCommand::Drain { name } => {
            cluster::drain(&name)?;
            println!("cluster {name}: this host takes no new clients");
            Ok(())
        }
        ClusterCommand::Certs { name, hosts, dir } => {
            for file in cluster::certs::make(&name, &hosts, &dir)? {
                println!("{}", file.display());
            }
            Ok(())
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
    // Keep clap's list of accepted values, its suggestions and the arguments it misses (one
    // per line before the usage), on the same line.
    let missing = e.kind() == ErrorKind::MissingRequiredArgument;
    let hints: Vec<&str> = lines
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| l.starts_with('[') || l.starts_with("tip:") || missing)
        .collect();
    if hints.is_empty() {
        eprintln!("{ERROR_PREFIX}{first} (see parsrv --help)");
    } else {
        eprintln!(
            "{ERROR_PREFIX}{first} {} (see parsrv --help)",
            hints.join(" ")
        );
    }
    EXIT_USAGE
}

fn group(command: GroupCommand) -> Result<()> {
    let (group, request) = match command {
        GroupCommand::Resize { group, handlers } => (group, Request::Resize { handlers }),
        GroupCommand::Restart { group } => (group, Request::Restart),
        GroupCommand::Remove { group } => (group, Request::Remove),
        GroupCommand::Show { group } => (group, Request::Show),
        GroupCommand::List => return list_groups(),
        GroupCommand::Add { spawner, group } => {
            if group.metrics.is_some() {
                return Err(Error::InvalidOption {
                    option: "--metrics",
                    value: group.metrics.clone().unwrap_or_default(),
                    reason: "metrics are set when the spawner starts (parsrv run --metrics)".into(),
                });
            }
            let groups = group.into_options()?.groups;
            let pid = control::resolve_spawner(spawner)?;
            return done(
                format!("spawner {pid}"),
                control::request_spawner(pid, &Request::Add { groups })?,
            );
        }
    };
    let group = control::resolve_group(Some(&group))?;
    done(group.clone(), control::request(&group, &request)?)
}

fn affinity(group: &str, client: Option<std::net::IpAddr>, json: bool) -> Result<()> {
    let entries = match control::request(group, &Request::Affinity { client })? {
        Response::Affinity(entries) => entries,
        other => return done(group.to_owned(), other),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).expect("plain data")
        );
        return Ok(());
    }
    if let (Some(client), true) = (client, entries.is_empty()) {
        return Err(Error::Rejected(format!(
            "group {group} has no entry for client {client}: it has not connected, or its \
             entry expired or was forgotten"
        )));
    }
    println!(
        "{:<40} {:>4} {:>8} {:>10} {:>10}",
        "client", "slot", "pid", "age-s", "idle-s"
    );
    for e in &entries {
        println!(
            "{:<40} {:>4} {:>8} {:>10.1} {:>10.1}",
            e.entry.client.to_string(),
            e.entry.slot,
            e.pid.map_or("-".to_string(), |p| p.to_string()),
            e.entry.age_ms as f64 / 1e3,
            e.entry.idle_ms as f64 / 1e3
        );
    }
    Ok(())
}

fn stop(group: &str) -> Result<()> {
    if control::is_live(&control::socket_path(group)) {
        return done(group.to_owned(), control::request(group, &Request::Remove)?);
    }
    println!("{}", spawner::stop_orphan(group)?);
    Ok(())
}

/// Asks the spawner to re-execute itself, then waits until the new image answers for
/// every group it had.
fn upgrade(spawner: Option<u32>) -> Result<()> {
    let pid = control::resolve_spawner(spawner)?;
    let groups: Vec<(String, u64)> = control::running_groups()
        .into_iter()
        .filter_map(|name| match control::request(&name, &Request::Status) {
            Ok(Response::Status(status)) if status.spawner_pid == pid => {
                Some((name, status.spawner_started_ms))
            }
            _ => None,
        })
        .collect();
    done(
        format!("spawner {pid}"),
        control::request_spawner(pid, &Request::Upgrade)?,
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for (name, before) in groups {
        loop {
            match control::request(&name, &Request::Status) {
                Ok(Response::Status(status)) if status.spawner_started_ms != before => {
                    println!(
                        "group {name}: adopted by the new image (parsrv {}), handlers {:?}",
                        status.spawner_version,
                        status
                            .handlers
                            .iter()
                            .filter_map(|h| h.pid)
                            .collect::<Vec<_>>()
                    );
                    break;
                }
                // A runtime failure (exit 1), not a usage error.
                _ if std::time::Instant::now() > deadline => {
                    return Err(Error::io(format!("waiting for spawner {pid}'s new image"))(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "group {name} was not adopted within 60 s: see the spawner's log"
                            ),
                        ),
                    ))
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

/// Prints what a spawner did, or turns its refusal into an error.
fn done(whom: String, response: Response) -> Result<()> {
    match response {
        Response::Done(message) => {
            println!("{message}");
            Ok(())
        }
        Response::Spec(spec) => {
            print!("{}", crate::config_file::to_toml(&[*spec]));
            Ok(())
        }
        Response::Failed(e) if e.is_usage() => Err(Error::Rejected(e.to_string())),
        Response::Failed(e) => Err(Error::Spawner {
            group: whom,
            message: e.to_string(),
        }),
        Response::Status(_)
        | Response::ClusterStatus(_)
        | Response::Affinity(_)
        | Response::Room(_) => Err(Error::Spawner {
            group: whom,
            message: "answered with something other than what was asked".into(),
        }),
    }
}

fn list_groups() -> Result<()> {
    let groups = control::running_groups();
    println!(
        "{:<24} {:<24} {:>8} {:<14} {:>8}",
        "group", "listen", "handlers", "policy", "spawner"
    );
    for name in groups {
        if let Ok(Response::Status(status)) = control::request(&name, &Request::Status) {
            println!(
                "{:<24} {:<24} {:>8} {:<14} {:>8}",
                status.spec.name,
                status.spec.listen_text(),
                status.handlers.len(),
                status.spec.policy.to_string(),
                status.spawner_pid
            );
        }
    }
    Ok(())
}

/// Execs parsrv-bench from this binary's directory.
fn bench(args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(Error::io("finding this binary"))?;
    let bench = exe.with_file_name("parsrv-bench");
    if !bench.is_file() {
        return Err(Error::Io {
            context: format!("{} is not built", bench.display()),
            source: std::io::Error::other(
                "build it with `cargo xtask bench` (or cargo build -p parsrv-bench)",
            ),
        });
    }
    let error = std::process::Command::new(&bench).args(args).exec();
    Err(Error::io(format!("running {}", bench.display()))(error))
}

fn kernel_features(json: bool) -> Result<()> {
    use crate::dataplane::verification::{self, thousands};
    use crate::features::{kernel_build, minimum_kernel, KernelFeatures};
    let probed = KernelFeatures::probe();
    let (programs, refused) = verification::report(&probed);
    if json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            #[serde(flatten)]
            features: &'a KernelFeatures,
            /// `uname -r (uname -v)`.
            build: String,
            programs: &'a [verification::ProgramReport],
        }
        let report = Report {
            features: &probed,
            build: kernel_build(),
            programs: &programs,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data")
        );
    } else {
        println!("kernel {}", kernel_build());
        println!("{:<36} {:>6}  {:<4} used for", "feature", "since", "here");
        for probe in &probed.features {
            println!(
                "{:<36} {:>6}  {:<4} {}",
                probe.name,
                probe.since.to_string(),
                if probe.present { "yes" } else { "NO" },
                probe.feature.used_for()
            );
        }
        println!(
            "verifier cost (parsrv keeps each program under {} insns processed):",
            thousands(verification::MARGIN_BUDGET)
        );
        for program in &programs {
            println!("  {:<22} {}", program.program, program.describe());
        }
    }
    if let Some(refusal) = refused {
        return Err(refusal);
    }
    probed.require_all().inspect(|()| {
        if !json {
            println!(
                "parsrv can run here (it needs Linux {} or newer)",
                minimum_kernel()
            );
        }
    })
}

fn check(path: &std::path::Path) -> Result<()> {
    let checked = crate::config_file::check(path)?;
    for problem in &checked.problems {
        println!(
            "{}:{}:{}: {}{}",
            path.display(),
            problem.line,
            problem.column,
            if problem.warning { "warning: " } else { "" },
            problem.message
        );
    }
    match checked.file {
        Some(file) => {
            println!(
                "{}: valid, {} group{}: {}",
                path.display(),
                file.groups.len(),
                if file.groups.len() == 1 { "" } else { "s" },
                file.groups
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for group in &file.groups {
                if let Some(memory) = group.dispatch_table_memory() {
                    println!("{}: {memory}", group.name);
                }
            }
            Ok(())
        }
        None => Err(Error::Rejected(format!(
            "{}: {} problem{}: fix them and check again",
            path.display(),
            checked.problems.len(),
            if checked.problems.len() == 1 { "" } else { "s" }
        ))),
    }
}

fn status(args: StatusArgs) -> Result<()> {
    let names = match &args.group {
        Some(name) => vec![control::resolve_group(Some(name))?],
        None => {
            let running = control::running_groups();
            if running.is_empty() {
                control::resolve_group(None)?; // says none is running
            }
            running
        }
    };
    let fetch = |names: &[String]| -> Result<Vec<GroupStatus>> {
        names
            .iter()
            .map(|name| match control::request(name, &Request::Status)? {
                Response::Status(status) => Ok(*status),
                other => Err(Error::Spawner {
                    group: name.clone(),
                    message: format!("could not report: {other:?}"),
                }),
            })
            .collect()
    };
    if args.json {
        let statuses = fetch(&names)?;
        let json = match (&args.group, statuses.as_slice()) {
            (Some(_), [one]) => serde_json::to_string_pretty(one),
            _ => serde_json::to_string_pretty(&statuses),
        };
        println!("{}", json.expect("serializable"));
        return Ok(());
    }
    if !args.watch {
        for status in fetch(&names)? {
            println!("{}", status.render());
        }
        return Ok(());
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.05, 3600.0));
    let mut previous: Option<(std::time::Instant, Vec<GroupStatus>)> = None;
    for update in 0.. {
        if args.count.is_some_and(|count| update >= count) {
            break;
        }
        let now = std::time::Instant::now();
        let statuses = fetch(&names)?;
        if std::io::stdout().is_terminal() {
            print!("\x1b[2J\x1b[H"); // clear the screen
        }
        for status in &statuses {
            println!("{}", status.render());
            let before = previous.as_ref().and_then(|(at, old)| {
                Some((*at, old.iter().find(|o| o.spec.name == status.spec.name)?))
            });
            if let Some((at, old)) = before {
                print!("{}", status.render_rates(old, now.duration_since(at)));
            }
        }
        previous = Some((now, statuses));
        std::thread::sleep(interval);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{HandlerKind, HandlerRange, Policy, WhenFull};

    /// The group `parsrv run` gets from these flags; a parse error as the usage error it is.
    fn run_args(extra: &[&str]) -> Result<GroupSpec> {
        let mut argv = vec!["parsrv", "run", "--listen", "127.0.0.1:8080"];
        if !extra.contains(&"--handler") {
            argv.extend(["--handler", "echo"]);
        }
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| Error::InvalidOption {
            option: "flags",
            value: String::new(),
            reason: e.to_string(),
        })?;
        match cli.command {
            Command::Run(args) => args
                .into_options()
                .map(|o| o.groups.into_iter().next().unwrap()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_config_file_or_a_group_from_flags_never_both() {
        let cli = Cli::try_parse_from(["parsrv", "run", "--config", "x.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run(RunArgs { group: None, .. })
        ));
        for argv in [
            &["parsrv", "run", "--config", "x.toml", "--backlog", "3"][..],
            &["parsrv", "run"],
            &["parsrv", "run", "--listen", "127.0.0.1:1"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn defaults_are_sane() {
        let options = run_args(&[]).unwrap();
        assert_eq!(options.handlers, HandlerRange { min: 4, max: 4 });
        assert!(!options.drain);
        assert_eq!(options.ready_timeout, 10.0);
        assert_eq!(options.threads, 1);
        assert_eq!(options.policy, Policy::Redirect);
        assert_eq!(options.when_full, WhenFull::Drop);
        assert_eq!(options.name, "127_0_0_1-8080");
        assert_eq!(options.grace, 5.0);
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
        assert_eq!(options.handler, HandlerKind::Exec);
        assert_eq!(options.command, ["sh", "-c", "exec true"]);
        assert_eq!(options.cpus.0, [0]);
        assert_eq!(options.user.as_deref(), Some("root"));
        let err = run_args(&["--cpus", "x"]).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn handler_ranges_and_drain_parse() {
        let options = run_args(&["--handlers", "2..6", "--drain"]).unwrap();
        assert_eq!(options.handlers, HandlerRange { min: 2, max: 6 });
        assert!(options.drain && options.autoscaled());
        let cli = Cli::try_parse_from(["parsrv", "group", "resize", "web", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Group(GroupCommand::Resize { handlers: 3, .. })
        ));
    }

    #[test]
    fn policy_and_when_full_flags_parse() {
        let options = run_args(&["--policy", "least-loaded", "--when-full", "refuse"]).unwrap();
        assert_eq!(options.policy, Policy::LeastLoaded);
        assert_eq!(options.when_full, WhenFull::Refuse);
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
