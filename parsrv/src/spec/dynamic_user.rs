//! `--user dynamic`: each group's handlers run as a uid of their own, as systemd's
//! `DynamicUser=` does for a service, so that the handlers of one group cannot reach
//! another's (ptrace, `pidfd_getfd` of its fd 3, signals, /proc): the kernel allows those
//! only between processes of one uid.
//!
//! The uid comes from the group's name (FNV-1a, stable across parsrv versions, so an
//! upgraded or adopting spawner computes the same one) in [`FIRST`]..=[`LAST`], a range
//! systemd's "Users, Groups, UIDs and GIDs" lists as unused (0x70000000-0x7FFDFFFF: not the
//! dynamic service users, not the container ranges), so that neither systemd nor a
//! container manager hands it out. The gid is the same number; handlers keep no
//! supplementary group. Nothing is written to /etc/passwd: like systemd's, such a handler
//! has no home and no name, and files it creates carry a bare number.
//!
//! A spawner that starts a group (not one that adopts it) refuses the uid when a user or
//! group of that number exists, or when a process already runs with it (another group's
//! name hashed to it, or something else uses it): one line naming the owner and the fix.

use super::{invalid, Credentials};
use crate::{error::Result, procfs};

/// The `--user` value that asks for a uid of the group's own.
pub const DYNAMIC: &str = "dynamic";

/// First uid of parsrv's range (0x7A700000).
pub const FIRST: u32 = 0x7A70_0000;
/// Last uid of parsrv's range: 65,536 uids.
pub const LAST: u32 = FIRST + 0xFFFF;

/// The uid (and gid) of group `name`'s handlers.
pub fn credentials_of(name: &str) -> Credentials {
    // FNV-1a, 32 bits: a few lines whose result never changes with the toolchain
    // (std's hasher may).
    let hash = name.bytes().fold(0x811C_9DC5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let id = FIRST + hash % (LAST - FIRST + 1);
    Credentials { uid: id, gid: id }
}

/// Refuses `credentials` (group `name`'s dynamic ones) if a user or group of that number
/// exists or a process runs with that uid or gid.
pub fn check_free(name: &str, credentials: Credentials) -> Result<()> {
    let refuse = |why: String| {
        invalid(
            "--user",
            DYNAMIC,
            format!(
                "group {name:?}'s uid {} {why}: rename the group, or name a user with --user",
                credentials.uid
            ),
        )
    };
    if let Ok(Some(user)) = nix::unistd::User::from_uid(credentials.uid.into()) {
        return Err(refuse(format!("belongs to user {:?}", user.name)));
    }
    if let Ok(Some(group)) = nix::unistd::Group::from_gid(credentials.gid.into()) {
        return Err(refuse(format!("is the gid of group {:?}", group.name)));
    }
    if let Some((pid, comm)) = process_with(credentials) {
        return Err(refuse(format!("is in use by pid {pid} ({comm})")));
    }
    Ok(())
}

/// A process whose real, effective, saved or file-system uid or gid is `credentials`'. A
/// zombie is not one: it can no longer act with them, and one that is not parsrv's child
/// waits for another parent to reap it.
fn process_with(credentials: Credentials) -> Option<(u32, String)> {
    procfs::pids().find_map(|pid| {
        if procfs::process_state(pid) == Some('Z') {
            return None;
        }
        // A process that exits meanwhile is simply not there.
        let ids = procfs::process_ids(pid)?;
        (ids.uids.contains(&credentials.uid) || ids.gids.contains(&credentials.gid))
            .then(|| (pid, procfs::comm(pid).unwrap_or_default()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_gets_a_stable_uid_in_the_range() {
        // Fixed values: a spawner of another version must compute the same uid to adopt
        // or upgrade the group.
        assert_eq!(credentials_of("web").uid, FIRST + 0xBC91);
        let a = credentials_of("127_0_0_1-8080");
        assert_eq!(a, credentials_of("127_0_0_1-8080"));
        assert_eq!(a.uid, a.gid);
        for name in ["", "a", "b", "web", "api", &"x".repeat(200)] {
            let id = credentials_of(name).uid;
            assert!((FIRST..=LAST).contains(&id), "{name}: {id:#x}");
        }
        assert_ne!(credentials_of("a").uid, credentials_of("b").uid);
    }

    #[test]
    fn a_uid_in_use_is_refused_naming_its_user_or_process() {
        // uid 0: a user (root) and processes (this one's not necessarily, but init's).
        let root = Credentials { uid: 0, gid: 0 };
        let e = check_free("web", root).unwrap_err().to_string();
        assert!(e.contains("belongs to user \"root\""), "{e}");
        // This process runs with its own uid and gid.
        let own = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let (pid, _) = process_with(Credentials { uid: own, gid }).unwrap();
        assert!(pid > 0);
        // Nobody has the top of the range (no user, group or process).
        check_free(
            "web",
            Credentials {
                uid: LAST,
                gid: LAST,
            },
        )
        .unwrap();
    }
}
