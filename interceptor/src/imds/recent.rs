//! imds::recent: the last requests the metadata API answered, who the kernel said made each and what
//! they got, kept in a small bounded ring for `interceptor status`. Recording is on the request path:
//! one short lock, no allocation once the ring is full (entries move in; the evicted one is freed
//! after the lock is released). Nothing secret is ever kept: names, ids, role ARNs and refusal reasons.

use std::{
    collections::VecDeque,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use super::node_credentials::Grant;
use crate::{bpf::Attribution, workload::Workload};

/// How many requests the agent remembers for `interceptor status`.
pub const REMEMBERED: NonZeroUsize = NonZeroUsize::new(32).expect("non-zero");

/// One answered request.
#[derive(Clone, Debug)]
pub struct AnsweredRequest {
    pub at: SystemTime,
    /// What the kernel recorded about the connection; `None`: it did not redirect it.
    pub caller: Option<Attribution>,
    pub workload: Option<Arc<Workload>>,
    /// The role ARN the workload was given, when the request got that far.
    pub role: Option<String>,
    /// Set when the caller was answered with the node's own credentials.
    pub node_credentials: Option<Grant>,
    pub route: &'static str,
    pub status: u16,
    /// Why it was refused (the `reason` label of the metrics), and the error's message.
    pub refusal: Option<(&'static str, String)>,
}

/// The last [`REMEMBERED`] (or `capacity`) answered requests.
#[derive(Debug)]
pub struct RecentRequests {
    capacity: NonZeroUsize,
    /// Newest at the front.
    ring: Mutex<VecDeque<AnsweredRequest>>,
}

impl Default for RecentRequests {
    fn default() -> Self {
        Self::new(REMEMBERED)
    }
}

impl RecentRequests {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.get())),
        }
    }

    /// Remembers `request`, forgetting the oldest when full.
    pub fn record(&self, request: AnsweredRequest) {
        let evicted = {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            let evicted = (ring.len() == self.capacity.get())
                .then(|| ring.pop_back())
                .flatten();
            ring.push_front(request);
            evicted
        };
        // Freed here, with the lock released.
        drop(evicted);
    }

    /// The requests remembered, newest first.
    pub fn newest_first(&self) -> Vec<AnsweredRequest> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(status: u16) -> AnsweredRequest {
        AnsweredRequest {
            at: SystemTime::UNIX_EPOCH,
            caller: None,
            workload: None,
            role: None,
            node_credentials: None,
            route: "credentials",
            status,
            refusal: None,
        }
    }

    fn statuses(recent: &RecentRequests) -> Vec<u16> {
        recent
            .newest_first()
            .iter()
            .map(|request| request.status)
            .collect()
    }

    #[test]
    fn keeps_the_newest_first_and_never_more_than_its_capacity() {
        let recent = RecentRequests::new(NonZeroUsize::new(3).unwrap());
        assert!(recent.newest_first().is_empty());
        recent.record(request(1));
        recent.record(request(2));
        assert_eq!(statuses(&recent), [2, 1]);
        for status in 3..=7 {
            recent.record(request(status));
        }
        assert_eq!(statuses(&recent), [7, 6, 5]);
    }

    #[test]
    fn a_full_ring_does_not_grow() {
        let recent = RecentRequests::default();
        for status in 0..100 {
            recent.record(request(status));
        }
        let ring = recent.ring.lock().unwrap();
        assert_eq!(ring.len(), REMEMBERED.get());
        assert_eq!(
            ring.capacity(),
            VecDeque::<AnsweredRequest>::with_capacity(REMEMBERED.get()).capacity(),
            "the ring allocated beyond its first allocation"
        );
    }
}
