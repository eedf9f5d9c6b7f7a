//! The scheduling queue: pods to try now, in arrival order, and pods that did not fit, waiting
//! out an exponential back-off (1 s doubling to 60 s, kube-scheduler's defaults) unless a change
//! in the cluster (a node added or changed, a pod gone) may have made room, which moves them all
//! back at once. A key is in the queue at most once. Time is passed in, so it is tested without
//! sleeping.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Queue {
    active: VecDeque<String>,
    queued: HashSet<String>,
    /// (ready at, key), and key -> ready at.
    backoff: BTreeSet<(Instant, String)>,
    backoff_at: HashMap<String, Instant>,
    attempts: HashMap<String, u32>,
}

impl Queue {
    /// Queues `key` to be tried now (new or changed pod), unless it is already waiting.
    pub fn add(&mut self, key: &str) {
        if self.queued.contains(key) || self.backoff_at.contains_key(key) {
            return;
        }
        self.queued.insert(key.to_string());
        self.active.push_back(key.to_string());
    }

    /// The next pod to try, moving pods whose back-off ended to the active queue first.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        while let Some((at, _)) = self.backoff.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.backoff.pop_first() {
                self.backoff_at.remove(&key);
                if self.queued.insert(key.clone()) {
                    self.active.push_back(key);
                }
            }
        }
        let key = self.active.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }

    /// `key` did not fit: try again after its back-off.
    pub fn back_off(&mut self, key: &str, now: Instant) -> Duration {
        let n = self.attempts.entry(key.to_string()).or_default();
        let wait = INITIAL_BACKOFF
            .saturating_mul(1u32 << (*n).min(6))
            .min(MAX_BACKOFF);
        *n += 1;
        self.remove(key);
        let at = now + wait;
        self.backoff.insert((at, key.to_string()));
        self.backoff_at.insert(key.to_string(), at);
        wait
    }

    /// Something changed that may make room: every backed-off pod is tried again now.
    pub fn retry_all(&mut self) {
        let waiting = std::mem::take(&mut self.backoff);
        self.backoff_at.clear();
        for (_, key) in waiting {
            if self.queued.insert(key.clone()) {
                self.active.push_back(key);
            }
        }
    }

    /// `key` was bound or deleted: forget it and its attempts.
    pub fn forget(&mut self, key: &str) {
        self.remove(key);
        self.attempts.remove(key);
    }

    fn remove(&mut self, key: &str) {
        if self.queued.remove(key) {
            self.active.retain(|k| k != key);
        }
        if let Some(at) = self.backoff_at.remove(key) {
            self.backoff.remove(&(at, key.to_string()));
        }
    }

    /// When the earliest back-off ends.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.backoff.first().map(|(at, _)| *at)
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Pods waiting, active and backed off.
    pub fn len(&self) -> usize {
        self.active.len() + self.backoff.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_without_duplicates() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.pop(now).as_deref(), Some("a"));
        assert_eq!(q.pop(now).as_deref(), Some("b"));
        assert_eq!(q.pop(now), None);
    }

    #[test]
    fn back_off_doubles_and_ends() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.add("a");
        assert_eq!(q.pop(t0).as_deref(), Some("a"));
        assert_eq!(q.back_off("a", t0), Duration::from_secs(1));
        q.add("a");
        assert_eq!(q.pop(t0), None, "a changed pod waits out its back-off");
        assert_eq!(q.pop(t0 + Duration::from_secs(1)).as_deref(), Some("a"));
        assert_eq!(q.back_off("a", t0), Duration::from_secs(2));
        assert_eq!(q.next_backoff(), Some(t0 + Duration::from_secs(2)));
        for _ in 0..10 {
            q.back_off("a", t0);
        }
        assert_eq!(q.back_off("a", t0), MAX_BACKOFF);
        q.forget("a");
        assert_eq!(q.len(), 0);
        assert_eq!(q.back_off("a", t0), INITIAL_BACKOFF, "attempts forgotten");
    }

    #[test]
    fn a_cluster_change_retries_everything() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        for k in ["a", "b"] {
            q.add(k);
            q.pop(t0);
            q.back_off(k, t0);
        }
        assert!(q.is_empty());
        q.retry_all();
        assert_eq!(q.pop(t0).as_deref(), Some("a"));
        assert_eq!(q.pop(t0).as_deref(), Some("b"));
    }
}
