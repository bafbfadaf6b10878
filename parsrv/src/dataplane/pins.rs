//! Pinned maps of a group, under `/sys/fs/bpf/parsrv/GROUP/`: filled in a staging directory
//! and renamed into place in one step, so that a reader never sees half a set; removed with
//! the group.

use std::{
    fs,
    path::{Path, PathBuf},
};

use parsrv_common::scope::STAGING_PREFIX;

use crate::{
    error::{Error, Result},
    kernel,
};

/// The links parsrv pins (a group's sk_lookup link, a cluster host's tcx link).
const LINKS: [&str; 2] = [
    parsrv_common::lookup::names::LINK,
    parsrv_common::cluster::names::LINK,
];

/// Removes a directory of pins, detaching the links pinned there by the time it returns.
///
/// A pinned link whose pin is the last reference is freed (and so detached) when the pin
/// goes, but Linux 6.x frees a link whose last reference went that way in a work item,
/// after the removal has returned: a test saw a cluster host's tcx program still attached
/// after its agent had exited and removed its pins. So each link is opened and unpinned
/// first, and its fd, now the last reference, is closed after the rest: a link's last fd
/// closed frees it at once.
pub fn remove_dir_detaching(dir: &Path) -> std::io::Result<()> {
    let held: Vec<aya::programs::links::FdLink> = LINKS
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| path.exists())
        .filter_map(|path| aya::programs::links::PinnedLink::from_pin(&path).ok())
        .filter_map(|link| link.unpin().ok())
        .collect();
    let removed = fs::remove_dir_all(dir);
    drop(held);
    removed
}

/// parsrv's directory on bpffs.
pub fn root() -> PathBuf {
    Path::new(kernel::BPFFS).join("parsrv")
}

/// Where a group's maps are pinned.
pub fn group_dir(group: &str) -> PathBuf {
    root().join(group)
}

/// Pinned maps: removed (files and directory) when dropped.
#[derive(Debug)]
pub struct Pins(pub(super) PathBuf);

impl Pins {
    /// A fresh staging directory beside `dir`, named for this process.
    pub(super) fn staging(dir: &Path) -> Result<Pins> {
        let parent = dir.parent().expect("pin directory has a parent");
        fs::create_dir_all(parent).map_err(Error::io(format!("creating {}", parent.display())))?;
        // bpffs refuses '.' in names; group names cannot start with '_'.
        let staging = parent.join(format!(
            "{STAGING_PREFIX}{}-{}",
            dir.file_name()
                .expect("pin directory has a name")
                .to_string_lossy(),
            std::process::id()
        ));
        fs::create_dir(&staging).map_err(Error::io(format!("creating {}", staging.display())))?;
        let pins = Pins(staging);
        // Root only, as the pins in it (0600): handlers run as other users must not reach the
        // maps, and the group's directory keeps this mode when renamed into place.
        use std::os::unix::fs::PermissionsExt;
        for dir in [parent, pins.0.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(Error::io(format!("restricting {}", dir.display())))?;
        }
        Ok(pins)
    }

    /// Moves this staging directory to `dir` in one step (a reader never sees half a set):
    /// the returned guard removes them there when dropped.
    pub(super) fn publish(self, dir: PathBuf) -> Result<Pins> {
        fs::rename(&self.0, &dir).map_err(Error::io(format!(
            "moving pinned maps to {}",
            dir.display()
        )))?;
        std::mem::forget(self);
        Ok(Pins(dir))
    }

    /// The pins of a running group this spawner adopts: its own from now on.
    pub fn adopt(dir: PathBuf) -> Pins {
        Pins(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Removes the pins (and any staging directory) left under `dir`'s name by a spawner that
    /// died without cleaning up. The caller has made sure no spawner of that group runs.
    pub fn remove_stale(dir: &Path) -> Result<()> {
        let mut stale = vec![dir.to_owned()];
        if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
            let prefix = format!("{STAGING_PREFIX}{}-", name.to_string_lossy());
            if let Ok(entries) = fs::read_dir(parent) {
                stale.extend(entries.flatten().map(|e| e.path()).filter(|path| {
                    path.file_name()
                        .and_then(|n| n.to_str()?.strip_prefix(&prefix))
                        .is_some_and(|pid| {
                            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
                        })
                }));
            }
        }
        for path in stale {
            match remove_dir_detaching(&path) {
                Ok(()) => log::warn!("removed stale pins at {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(format!(
                        "removing stale pins at {}",
                        path.display()
                    ))(e))
                }
            }
        }
        Ok(())
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = remove_dir_detaching(&self.0) {
            log::error!("could not remove pins at {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pins_and_only_this_groups_staging_are_removed() {
        let root = std::env::temp_dir().join(format!("parsrv-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for dir in [
            "a",
            "_staging-a-123",
            "a-b",
            "_staging-a-b-77",
            "_staging-a-x",
        ] {
            fs::create_dir_all(root.join(dir).join("MAP")).unwrap();
        }
        Pins::remove_stale(&root.join("a")).unwrap();
        let mut left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["_staging-a-b-77", "_staging-a-x", "a-b"]);
        Pins::remove_stale(&root.join("a")).unwrap(); // nothing left to remove: fine
        fs::remove_dir_all(&root).unwrap();
    }
}
