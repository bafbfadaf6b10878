//! `parsrv status`: a running group's handlers, queue depths and counters, once, as JSON, or
//! watched.

use std::{io::IsTerminal, time::Duration};

use super::StatusArgs;
use crate::{
    control::{self, Request, Response},
    error::{Error, Result},
    status::GroupStatus,
};

pub(super) fn status(args: StatusArgs) -> Result<()> {
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
