//! imds::limits: bounds on the metadata connections open at once, over all callers and per caller
//! (cgroup), so that one workload flooding the agent can neither starve the others nor run the agent
//! out of file descriptors. A connection over a bound is closed at accept, before a byte is read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use interceptor_common::CgroupId;

/// Open connections the agent serves at once. A node runs at most a few hundred pods, and an SDK
/// holds one or two connections while it fetches credentials.
pub const MAX_CONNECTIONS: usize = 4096;
/// Open connections one caller (container cgroup) may hold. Above what a burst of concurrent first
/// requests from one process needs (the tests make 100), far below [`MAX_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_CALLER: usize = 128;

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// [`MAX_CONNECTIONS`] are open.
    Global,
    /// The caller holds its [`MAX_CONNECTIONS_PER_CALLER`].
    Caller,
}

impl OverLimit {
    pub fn label(self) -> &'static str {
        match self {
            OverLimit::Global => "global_limit",
            OverLimit::Caller => "caller_limit",
        }
    }
}

/// Counts of open connections. Unattributed connections share one count: they are all refused, and
/// none of them may crowd out attributed callers beyond its own share.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_caller: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_caller: HashMap<Option<CgroupId>, usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CALLER)
    }
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_caller: usize) -> Self {
        Self {
            max_total,
            max_per_caller,
            open: Mutex::new(OpenConnections::default()),
        }
    }

    /// Counts a new connection of `caller`; it stays counted until the returned guard drops.
    pub fn admit(self: &Arc<Self>, caller: Option<CgroupId>) -> Result<OpenConnection, OverLimit> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(OverLimit::Global);
        }
        let held = open.by_caller.entry(caller).or_default();
        if *held >= self.max_per_caller {
            return Err(OverLimit::Caller);
        }
        *held += 1;
        open.total += 1;
        Ok(OpenConnection {
            limits: self.clone(),
            caller,
        })
    }

    fn release(&self, caller: Option<CgroupId>) {
        let mut open = self.lock();
        open.total -= 1;
        if let Some(held) = open.by_caller.get_mut(&caller) {
            *held -= 1;
            if *held == 0 {
                open.by_caller.remove(&caller);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct OpenConnection {
    limits: Arc<ConnectionLimits>,
    caller: Option<CgroupId>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.limits.release(self.caller);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_share_and_all_share_the_total() {
        let limits = Arc::new(ConnectionLimits::new(5, 2));
        let (a, b) = (Some(CgroupId(1)), Some(CgroupId(2)));
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), OverLimit::Caller);
        let _b1 = limits.admit(b).unwrap();
        let _b2 = limits.admit(b).unwrap();
        let _unattributed = limits.admit(None).unwrap();
        assert_eq!(limits.admit(Some(CgroupId(3))).unwrap_err(), OverLimit::Global);
        drop(first);
        assert!(limits.admit(a).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn released_callers_leave_no_entry_behind() {
        let limits = Arc::new(ConnectionLimits::new(10, 10));
        for id in 0..5 {
            drop(limits.admit(Some(CgroupId(id))).unwrap());
        }
        let open = limits.lock();
        assert_eq!((open.total, open.by_caller.len()), (0, 0));
    }
}
