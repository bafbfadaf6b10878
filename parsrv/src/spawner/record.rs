//! What a running group leaves in the run directory for the spawner after this one (after a
//! crash, a SIGKILL, or `parsrv upgrade`): its spec and, per slot, its socket's cookie and
//! its handler's identity (pid and start time). Everything else a spawner needs lives in the
//! kernel: the sockets in the handlers (taken with pidfd_getfd), the program and its maps
//! in the group's pin directory. Rewritten whole (write, then rename) whenever a handler
//! starts or exits and whenever the group changes size; removed when the group stops.

use std::{
    fs, io,
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    spec::GroupSpec,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The spawner that wrote it.
    pub spawner_pid: u32,
    pub spec: GroupSpec,
    /// In slot order.
    pub slots: Vec<SlotRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// SO_COOKIE of the slot's socket: what to look for among the handler's fds.
    pub cookie: u64,
    /// Its handler, if one runs.
    pub handler: Option<HandlerRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerRecord {
    pub pid: u32,
    /// From /proc/PID/stat: with the pid, the process's identity (a reused pid differs).
    pub start_time: u64,
    pub restarts: u32,
    pub ready: bool,
}

impl GroupRecord {
    pub fn path(group: &str) -> PathBuf {
        crate::run_dir::run_dir().join(format!("{group}.json"))
    }

    /// The record of `group`, if there is a readable one. One that cannot be parsed (written
    /// by another version) is treated as absent, with a warning: the group then starts anew.
    ///
    /// Root acts on what a record says (it signals the processes it names), so only a
    /// record root wrote is read: a regular file, not a link (O_NOFOLLOW), owned by root and
    /// writable by no one else. Any other is left where it is, with a warning.
    pub fn read(group: &str) -> Option<GroupRecord> {
        let path = Self::path(group);
        let text = match read_root_file(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!(
                    "cannot read {}: {e}; starting the group anew",
                    path.display()
                );
                return None;
            }
        };
        serde_json::from_str(&text)
            .inspect_err(|e| {
                log::warn!(
                    "cannot parse {}: {e}; starting the group anew",
                    path.display()
                )
            })
            .ok()
    }

    /// Writes it in one step: a reader sees the old record or the new one, never half.
    pub fn write(&self) -> Result<()> {
        let path = Self::path(&self.spec.name);
        let staging = path.with_extension(format!("json.{}", std::process::id()));
        let text = serde_json::to_vec(self).expect("a record serializes");
        // A new file (never through a link planted at the staging name), root's alone.
        let _ = fs::remove_file(&staging);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)
            .and_then(|mut file| file.write_all(&text))
            .and_then(|()| fs::rename(&staging, &path))
            .map_err(|e| {
                let _ = fs::remove_file(&staging);
                Error::io(format!("writing {}", path.display()))(e)
            })
    }

    pub fn remove(group: &str) {
        let path = Self::path(group);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    /// The pids of the recorded handlers that still run and show that they are (the same
    /// start time, and `handler::shows_it_is`), read without touching them.
    pub fn live_handlers(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, recorded)| {
                let handler = recorded.handler?;
                let same = crate::supervisor::process_start_time(handler.pid)
                    == Some(handler.start_time)
                    && crate::handler::shows_it_is(handler.pid, &self.spec.name, slot);
                same.then_some(handler.pid)
            })
            .collect()
    }

    /// The config keys whose values differ between the running group and `asked`, each as
    /// `key (running: X, asked: Y)`.
    pub fn differences(&self, asked: &GroupSpec) -> Vec<String> {
        let object = |spec: &GroupSpec| match serde_json::to_value(spec) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        };
        let (running, asked) = (object(&self.spec), object(asked));
        let mut keys: Vec<&String> = running.keys().chain(asked.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.to_string());
        keys.into_iter()
            .filter(|key| running.get(*key) != asked.get(*key))
            .map(|key| {
                format!(
                    "{key} (running: {}, asked: {})",
                    show(running.get(key)),
                    show(asked.get(key))
                )
            })
            .collect()
    }
}

/// The contents of `path` if it is a regular file (not followed through a link) that root
/// owns and no one else may write; an error naming what is wrong otherwise.
fn read_root_file(path: &Path) -> io::Result<String> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "not root's own file (owner uid {}, mode {:o}): left alone",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HandlerKind;

    #[test]
    fn names_the_keys_that_differ() {
        let spec = GroupSpec::new("127.0.0.1:8080".parse().unwrap(), HandlerKind::Http);
        let record = GroupRecord {
            spawner_pid: 1,
            spec: spec.clone(),
            slots: vec![],
        };
        assert!(record.differences(&spec).is_empty());
        let mut asked = spec.clone();
        asked.backlog = spec.backlog + 1;
        asked.threads = 9;
        let differences = record.differences(&asked);
        assert_eq!(differences.len(), 2, "{differences:?}");
        assert!(
            differences[0].starts_with("backlog (running: "),
            "{differences:?}"
        );
        assert!(
            differences[1].starts_with("threads (running: "),
            "{differences:?}"
        );
        assert!(differences[1].ends_with("asked: 9)"), "{differences:?}");
    }
}
