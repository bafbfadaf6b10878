//! Where parsrv's output goes, so that people and scripts can tell a log from an error.
//!
//! - **Results** (status tables, JSON, `group show`): stdout.
//! - **Logs**: stderr, one line each, `parsrv[PID] LEVEL: message`; a handler's own output
//!   is forwarded by its spawner as `parsrv[PID] handler SLOT[HANDLER_PID]: line`. A handler
//!   process logs `LEVEL: message` (its spawner adds the prefix).
//! - **The error that ends a command**: stderr, after any logs, exactly one line
//!   `parsrv: cause ...: fix`, and the exit code says its kind (see [`crate::error`]).
//!
//! So the error of a failed command is its one stderr line that is not a log line, and it is
//! the last: a run that logs first (say "mounted bpffs at /sys/fs/bpf" on a freshly booted
//! machine) and then fails still has an error of exactly one line.

use std::io::Write as _;

/// What every line that ends a command with an error starts with.
pub const ERROR_PREFIX: &str = "parsrv: ";

/// The prefix of every log line a spawner or query command writes.
pub fn log_prefix(pid: u32) -> String {
    format!("parsrv[{pid}] ")
}

/// Whether `line` is a log line (not an error): `parsrv[` digits `] `.
pub fn is_log_line(line: &str) -> bool {
    line.strip_prefix("parsrv[")
        .and_then(|rest| rest.split_once("] "))
        .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The error line of a failed command's stderr, if its stderr keeps the contract above:
/// log lines, then exactly one error line, last.
pub fn error_line(stderr: &str) -> Option<&str> {
    let mut others = stderr.lines().filter(|line| !is_log_line(line));
    let error = others.next()?;
    let last = stderr.lines().last()?;
    (others.next().is_none() && error == last && error.starts_with(ERROR_PREFIX)).then_some(error)
}

/// Logs to stderr, at `RUST_LOG`'s level (info by default). A handler's lines get no
/// prefix: its spawner adds one with the slot.
pub fn init_logging(handler: bool) {
    let who = if handler {
        String::new()
    } else {
        log_prefix(std::process::id())
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| writeln!(buf, "{who}{}: {}", record.level(), record.args()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_told_from_the_error_line() {
        assert!(is_log_line("parsrv[42] INFO: mounted bpffs at /sys/fs/bpf"));
        assert!(is_log_line("parsrv[7] handler 0[8]: hello"));
        assert!(!is_log_line("parsrv: 127.0.0.1:8080 is already in use"));
        assert!(!is_log_line("parsrv[] INFO: no pid"));
        assert!(!is_log_line("parsrv[4x2] INFO: not a pid"));
        assert!(!is_log_line("thread 'main' panicked"));

        let logged = "parsrv[42] INFO: mounted bpffs at /sys/fs/bpf\nparsrv: in use: fix\n";
        assert_eq!(error_line(logged), Some("parsrv: in use: fix"));
        assert_eq!(
            error_line("parsrv: in use: fix"),
            Some("parsrv: in use: fix")
        );
        // Two error lines, an error before a log line, a stray line, no error at all.
        assert_eq!(error_line("parsrv: a\nparsrv: b\n"), None);
        assert_eq!(error_line("parsrv: a\nparsrv[1] INFO: b\n"), None);
        assert_eq!(error_line("oops\nparsrv: a\n"), None);
        assert_eq!(error_line("parsrv[1] INFO: b\n"), None);
        assert_eq!(error_line(""), None);
    }
}
