//! How a host's copy of the dispatch table takes in what its peers send, so that every copy
//! ends the same whatever the order the messages arrive in.

use parsrv_common::cluster::ClientEntry;

/// Whether to write a peer's entry for a client over ours.
///
/// - We have none: take it.
/// - It names a host we know is gone: ignore it (its connections are gone with the host, and
///   the client has been, or will be, decided again).
/// - Ours names a host that is gone: take theirs (a new decision).
/// - Both name live hosts: the earlier lock holds, and of two placed at the same nanosecond,
///   the lower host id's (two dispatchers that lock one new client at once
///   converge on one server).
pub fn takes(
    ours: Option<&ClientEntry>,
    theirs: &ClientEntry,
    present: impl Fn(u16) -> bool,
) -> bool {
    if !present(theirs.host) {
        return false;
    }
    match ours {
        None => true,
        Some(ours) if !present(ours.host) => true,
        Some(ours) => {
            (theirs.locked_ns, theirs.locker) != (ours.locked_ns, ours.locker)
                && theirs.wins_over(ours)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: u16, locker: u16, locked_ns: u64) -> ClientEntry {
        ClientEntry {
            host,
            locker,
            locked_ns,
            ..Default::default()
        }
    }

    #[test]
    fn two_copies_converge_whatever_the_order() {
        let all_present = |_| true;
        let a = entry(2, 1, 100);
        let b = entry(3, 3, 100);
        let c = entry(1, 2, 99);
        for order in [[a, b, c], [c, b, a], [b, a, c], [b, c, a]] {
            let mut table: Option<ClientEntry> = None;
            for e in order {
                if takes(table.as_ref(), &e, all_present) {
                    table = Some(e);
                }
            }
            assert_eq!(table, Some(c), "{order:?}");
        }
        // Same time: the lower locker.
        assert!(takes(Some(&b), &a, all_present));
        assert!(!takes(Some(&a), &b, all_present));
        // The same entry again changes nothing.
        assert!(!takes(Some(&a), &a, all_present));
    }

    #[test]
    fn entries_naming_a_gone_host_lose() {
        let gone = |host| host != 3;
        assert!(!takes(None, &entry(3, 1, 1), gone));
        assert!(takes(Some(&entry(3, 1, 1)), &entry(2, 2, 50), gone));
        assert!(!takes(Some(&entry(2, 2, 50)), &entry(3, 1, 1), gone));
    }
}
