//! The `parsrv` command line: the clap model of every verb and the dispatch from a parsed
//! command to the verb's file beside this one.

use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::{
    config_file::ConfigFile,
    error::{Error, Result, EXIT_RUNTIME, EXIT_USAGE},
    handler,
    output::ERROR_PREFIX,
    spawner::{self, RunOptions},
    spec::{self, GroupSpec},
};

mod affinity;
mod bench;
mod check;
mod cluster;
mod completions;
mod group;
mod kernel;
mod man;
mod status;
mod stop;
mod upgrade;

#[cfg(test)]
mod tests;

#[derive(Debug, Parser)]
#[command(
    name = "parsrv",
    version,
    long_version = long_version(),
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

/// `parsrv --version`: the version and commit, the eBPF object and its toolchain, and the
/// kernels the programs need.
pub fn long_version() -> &'static str {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use crate::{
            build_info::{COMMIT, EBPF_OBJECT_SHA256, EBPF_TOOLCHAIN},
            dataplane::Program,
            features,
        };
        let cluster = features::needed_by(&[Program::ClusterDispatch])
            .iter()
            .map(|f| f.since())
            .max()
            .expect("the cluster needs features");
        format!(
            "{} (commit {COMMIT})\neBPF object sha256 {EBPF_OBJECT_SHA256}\neBPF toolchain \
             {EBPF_TOOLCHAIN}\nkernels: groups need Linux {} or newer, a cluster host {} or newer",
            env!("CARGO_PKG_VERSION"),
            features::minimum_kernel(),
            cluster,
        )
    });
    &TEXT
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process: a few hundred bytes on main's stack cost nothing"
)]
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
    /// Print the completion script of SHELL (packages install it where the shell looks:
    /// /usr/share/bash-completion/completions/parsrv, ...).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, parsrv(8) and one per verb (parsrv-run(8), ...), into DIR (what
    /// `cargo xtask package` installs).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
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
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS", value_parser = seconds_between_updates)]
    pub interval: f64,
    /// With --watch: stop after this many updates.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// `--interval`: a finite number of seconds above zero (a NaN would reach `Duration`, which
/// panics on it).
fn seconds_between_updates(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err("expected a number of seconds above 0, e.g. 0.5".into()),
    }
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
        Command::Status(args) => status::status(args),
        Command::Check { config } => check::check(&config),
        Command::Kernel { json } => kernel::kernel_features(json),
        Command::Bench { args } => bench::bench(&args),
        Command::Group(command) => group::group(command),
        Command::Stop { group } => stop::stop(&group),
        Command::Affinity {
            group,
            client,
            json,
        } => affinity::affinity(&group, client, json),
        Command::Upgrade { spawner } => upgrade::upgrade(spawner),
        Command::Cluster(command) => cluster::cluster(command),
        Command::Completions { shell } => completions::completions(shell),
        Command::Man { dir } => man::man(&dir),
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
