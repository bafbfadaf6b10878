//! SIGHUP: reads the config file again; starts the groups it adds, stops (draining) the ones
//! it removes, and reports the ones it changes (a running group keeps its settings).

use std::{collections::BTreeMap, rc::Rc};

use super::Spawner;
use crate::{config_file::ConfigFile, spec::GroupSpec};

impl Spawner {
    /// SIGHUP: reads the config file again; starts the groups it adds, stops (draining) the
    /// ones it removes, and reports the ones it changes.
    pub(super) async fn reload(self: &Rc<Self>) {
        let Some(path) = &self.config else {
            log::warn!("SIGHUP: nothing to reload (not started with --config)");
            return;
        };
        let file = match ConfigFile::load(path) {
            Ok(file) => file,
            Err(e) => {
                log::error!("SIGHUP: {e}; nothing changed");
                return;
            }
        };
        let wanted: BTreeMap<String, GroupSpec> = file
            .groups
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let running: Vec<String> = self.groups.borrow().keys().cloned().collect();
        for name in running.iter().filter(|n| !wanted.contains_key(*n)) {
            log::info!("SIGHUP: group {name} left the config: stopping it");
            self.remove_group(name).await;
        }
        for (name, spec) in wanted {
            match self.group(&name) {
                None => match self.start_group(spec) {
                    Ok(_) => log::info!("SIGHUP: group {name} started"),
                    Err(e) => log::error!("SIGHUP: group {name} not started: {e}"),
                },
                Some(group) if group.spec != spec => {
                    let changed = changed_fields(&group.spec, &spec);
                    log::warn!(
                        "SIGHUP: group {name} changed ({changed}): a running group keeps its \
                         settings; apply them with `parsrv group remove {name}` and `parsrv group \
                         add`, or for the handler count within MIN..MAX `parsrv group resize {name} N`"
                    );
                }
                Some(_) => {}
            }
        }
    }
}

/// The fields in which two specs of one group differ, by name.
fn changed_fields(old: &GroupSpec, new: &GroupSpec) -> String {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return "settings".into();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
