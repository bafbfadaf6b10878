//! How a host's copy of the dispatch table takes in what its peers send, so that every copy
//! ends the same whatever the order the messages arrive in.

use parsrv_common::cluster::{entry_flags, ClientEntry};

/// What a host does with a peer's entry for a client ([`merge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Write this entry over ours: theirs, flagged [`entry_flags::MAY_HAVE_OWN`] when it
    /// displaces a decision of this host's (connections made under our lock stay here).
    Write(ClientEntry),
    /// Ours holds against another lock of theirs (counted: `messages.lost`).
    Lost,
    /// Nothing to do: the same lock again, or an entry that names a gone host where we
    /// have none.
    Keep,
}

/// Takes in a peer's entry for a client: [`takes`], and what that means for this host's
/// copy. `present(host)` tells whether a host is not gone.
pub fn merge(
    ours: Option<&ClientEntry>,
    theirs: ClientEntry,
    this_host: u16,
    present: impl Fn(u16) -> bool,
) -> Merge {
    if takes(ours, &theirs, present) {
        let mut theirs = theirs;
        if ours.is_some_and(|o| o.host == this_host) {
            theirs.flags |= entry_flags::MAY_HAVE_OWN;
        }
        return Merge::Write(theirs);
    }
    match ours {
        Some(o) if *o != theirs && o.locked_ns != theirs.locked_ns => Merge::Lost,
        _ => Merge::Keep,
    }
}

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

    /// Every order of `messages` (a multiset: repeated messages give repeated orders).
    fn orders(messages: &[ClientEntry]) -> Vec<Vec<ClientEntry>> {
        if messages.len() <= 1 {
            return vec![messages.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..messages.len() {
            let mut rest = messages.to_vec();
            let first = rest.remove(i);
            for mut tail in orders(&rest) {
                tail.insert(0, first);
                all.push(tail);
            }
        }
        all
    }

    #[test]
    fn two_simultaneous_locks_of_one_client_converge_in_every_message_order() {
        let all_present = |_| true;
        // Hosts 1 and 2 lock one new client at once (the same nanosecond, or one earlier);
        // host 3 hears both. Each message may come twice: a peer that reconnects sends its
        // whole table again.
        for (ns_1, ns_2) in [(100, 100), (100, 99), (99, 100)] {
            let lock_1 = entry(1, 1, ns_1);
            let lock_2 = entry(2, 2, ns_2);
            let winner = if lock_1.wins_over(&lock_2) {
                lock_1
            } else {
                lock_2
            };
            let copies = [
                (1, Some(lock_1), vec![lock_2, lock_2]),
                (2, Some(lock_2), vec![lock_1, lock_1]),
                (3, None, vec![lock_1, lock_2, lock_1, lock_2]),
            ];
            for (host, own, heard) in copies {
                for order in orders(&heard) {
                    let mut copy = own;
                    for theirs in &order {
                        if let Merge::Write(e) = merge(copy.as_ref(), *theirs, host, all_present) {
                            copy = Some(e);
                        }
                    }
                    let copy = copy.expect("an entry");
                    let case = format!("host {host}, locks at {ns_1} and {ns_2}, order {order:?}");
                    assert_eq!(
                        (copy.host, copy.locker, copy.locked_ns),
                        (winner.host, winner.locker, winner.locked_ns),
                        "{case}"
                    );
                    // Only the host whose own lock lost keeps the mark that it may still
                    // have connections of the client.
                    let lost_its_own = own.is_some_and(|o| o != winner);
                    assert_eq!(
                        copy.flags & entry_flags::MAY_HAVE_OWN != 0,
                        lost_its_own,
                        "{case}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_peers_entry_is_written_counted_lost_or_left() {
        let all_present = |_| true;
        let ours = entry(1, 1, 50);
        // An earlier lock of another host's displaces this host's decision, marked.
        let earlier = entry(2, 2, 40);
        let Merge::Write(written) = merge(Some(&ours), earlier, 1, all_present) else {
            panic!("an earlier lock must be written");
        };
        assert_eq!(written.flags, entry_flags::MAY_HAVE_OWN);
        // Displacing another host's entry marks nothing.
        assert_eq!(
            merge(Some(&entry(3, 3, 50)), earlier, 1, all_present),
            Merge::Write(earlier)
        );
        // A later lock loses, and is counted; the same lock again is not.
        assert_eq!(
            merge(Some(&ours), entry(2, 2, 60), 1, all_present),
            Merge::Lost
        );
        assert_eq!(merge(Some(&ours), ours, 1, all_present), Merge::Keep);
        // An entry for a gone host is never written: against ours it counts as lost, and
        // where we have none it is left.
        assert_eq!(
            merge(Some(&ours), entry(3, 3, 10), 1, |h| h != 3),
            Merge::Lost
        );
        assert_eq!(merge(None, entry(3, 3, 10), 1, |h| h != 3), Merge::Keep);
    }

    #[test]
    fn entries_naming_a_gone_host_lose() {
        let gone = |host| host != 3;
        assert!(!takes(None, &entry(3, 1, 1), gone));
        assert!(takes(Some(&entry(3, 1, 1)), &entry(2, 2, 50), gone));
        assert!(!takes(Some(&entry(2, 2, 50)), &entry(3, 1, 1), gone));
    }
}
