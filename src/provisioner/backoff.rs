//! Per-object retry delays of the provisioner's reconcilers.
//!
//! Every failure of an object (claim or PV, by uid) doubles its next delay,
//! 1 s up to 5 min. The table must not outlive its objects: an entry goes
//! when its object succeeds, when its object is deleted, and, for objects
//! that vanished without a last reconcile (deleted with no finalizer, or
//! removed while the agent was not watching), once it has not failed for
//! longer than [`FORGET_AFTER`], which is when its delay would have been
//! forgotten anyway.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest delay between two attempts on one object.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// An entry whose object has not failed for this long is dropped: its next
/// requeue would have come long before, so the object is gone or healthy.
pub const FORGET_AFTER: Duration = Duration::from_secs(2 * 300);

#[derive(Debug, Clone, Copy)]
struct Failures {
    consecutive: u32,
    /// The first failure of this run of failures.
    first: Instant,
    last: Instant,
}

/// Consecutive failures per object uid.
#[derive(Debug, Default)]
pub struct Backoffs {
    entries: HashMap<String, Failures>,
}

impl Backoffs {
    /// Counts a failure of `uid` at `now`; the delay before its next attempt.
    /// Also drops the entries of objects not heard of for [`FORGET_AFTER`].
    pub fn failed(&mut self, uid: &str, now: Instant) -> Duration {
        self.failed_since(uid, now).0
    }

    /// As [`Backoffs::failed`], with how long `uid` has been failing.
    pub fn failed_since(&mut self, uid: &str, now: Instant) -> (Duration, Duration) {
        self.entries
            .retain(|_, f| now.saturating_duration_since(f.last) < FORGET_AFTER);
        let f = self.entries.entry(uid.to_string()).or_insert(Failures {
            consecutive: 0,
            first: now,
            last: now,
        });
        f.consecutive = (f.consecutive + 1).min(10);
        f.last = now;
        (
            Duration::from_secs(1 << (f.consecutive - 1)).min(MAX_DELAY),
            now.saturating_duration_since(f.first),
        )
    }

    /// The object succeeded, or was deleted: its delays start over (or end).
    pub fn forget(&mut self, uid: &str) {
        self.entries.remove(uid);
    }

    /// How many objects have a delay recorded.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_five_minutes() {
        let mut b = Backoffs::default();
        let t = Instant::now();
        let delays: Vec<u64> = (0..12).map(|_| b.failed("a", t).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        b.forget("a");
        assert_eq!(b.failed("a", t), Duration::from_secs(1), "starts over");
    }

    #[test]
    fn tells_how_long_an_object_has_been_failing() {
        let mut b = Backoffs::default();
        let t = Instant::now();
        assert_eq!(b.failed_since("a", t).1, Duration::ZERO);
        let later = t + Duration::from_secs(70);
        assert_eq!(
            b.failed_since("a", later),
            (Duration::from_secs(2), Duration::from_secs(70))
        );
        b.forget("a");
        assert_eq!(b.failed_since("a", later).1, Duration::ZERO, "starts over");
    }

    #[test]
    fn a_deleted_object_leaves_no_entry() {
        let mut b = Backoffs::default();
        let t = Instant::now();
        b.failed("claim-that-failed-then-was-deleted", t);
        b.failed("other", t);
        b.forget("claim-that-failed-then-was-deleted");
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn objects_not_heard_of_for_the_window_are_dropped_when_the_table_is_touched() {
        let mut b = Backoffs::default();
        let t = Instant::now();
        for i in 0..100 {
            b.failed(&format!("vanished-{i}"), t);
        }
        b.failed("still-failing", t + FORGET_AFTER / 2);
        assert_eq!(b.len(), 101, "nothing is old yet");
        // A new failure after the window: the vanished objects go, the one
        // that kept failing stays and keeps its count.
        let later = t + FORGET_AFTER + Duration::from_secs(1);
        b.failed("new", later);
        assert_eq!(b.len(), 2);
        assert_eq!(b.failed("still-failing", later), Duration::from_secs(2));
    }
}
