//! `parsrv group`: change a running group through its spawner, list the running groups; and
//! [`done`], how every verb prints a spawner's answer.

use super::GroupCommand;
use crate::{
    control::{self, Request, Response},
    error::{Error, Result},
};

pub(super) fn group(command: GroupCommand) -> Result<()> {
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

/// Prints what a spawner did, or turns its refusal into an error.
///
/// Every verb that sends a spawner a request other than `Status` ends here (`group`, `stop`,
/// `upgrade`, and `affinity` for an answer other than its entries), so it lives with the verb
/// that sends most of them.
pub(super) fn done(whom: String, response: Response) -> Result<()> {
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
