//! imds::limits: who shares a limit ([`LimitKey`]: a pod, or outside pods a cgroup), and bounds on
//! the metadata connections open at once, over all callers and per caller, so that one workload
//! flooding the agent can neither starve the others nor run the agent out of file descriptors. A
//! connection over a bound is closed at accept, before a byte is read. The request rate per caller is
//! [`super::rate`]'s.

use std::{
    collections::HashMap,
    num::{NonZeroU32, NonZeroUsize},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use interceptor_common::CgroupId;
use lru::LruCache;

use crate::identity::{CgroupResolver, PodUid, parse_pod_cgroup};

/// Open connections the agent serves at once, by default. A node runs at most a few hundred pods,
/// and an SDK holds one or two connections while it fetches credentials.
pub const DEFAULT_MAX_CONNECTIONS: NonZeroU32 = NonZeroU32::new(4096).expect("non-zero");
/// Open connections one caller may hold, by default. Above what a burst of concurrent first requests
/// from a pod's processes needs (the tests make 100 from one container), far below
/// [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: NonZeroU32 = NonZeroU32::new(128).expect("non-zero");

/// Who shares a limit. All containers of a pod share its limits, so a pod cannot multiply its share
/// by running more containers (or by making cgroups below its own); outside pods (node daemons of a
/// static workload file) each cgroup has limits of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Pod(Arc<PodUid>),
    Cgroup(CgroupId),
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Pod(uid) => write!(f, "pod {uid}"),
            LimitKey::Cgroup(id) => write!(f, "cgroup {}", id.0),
        }
    }
}

/// The [`LimitKey`] of each cgroup id the kernel attributes a connection to, found once per cgroup
/// and cached, so the accept loop pays a map lookup per connection, not a path resolution. Caching is
/// sound because the kernel never reuses a cgroup id while the machine runs, and the pod a cgroup
/// sits in names only whose limits it counts against: a stale entry (a cgroup renamed by root) moves
/// a caller's counts, never its identity or its role.
pub struct LimitKeys {
    cgroups: Arc<dyn CgroupResolver>,
    known: Mutex<LruCache<CgroupId, LimitKey>>,
}

impl LimitKeys {
    /// `capacity`: cgroups remembered (the least recently seen is forgotten first, and found again
    /// when it comes back).
    pub fn new(cgroups: Arc<dyn CgroupResolver>, capacity: NonZeroUsize) -> Self {
        Self {
            cgroups,
            known: Mutex::new(LruCache::new(capacity)),
        }
    }

    pub fn key_of(&self, cgroup_id: CgroupId) -> LimitKey {
        if let Some(key) = self.lock().get(&cgroup_id) {
            return key.clone();
        }
        let key = self.resolve(cgroup_id);
        self.lock().put(cgroup_id, key.clone());
        key
    }

    /// The pod named by the cgroup's path; otherwise the cgroup itself, also when its path cannot be
    /// read (removed since the connect: its requests are refused when their workload is looked up).
    /// That answer is cached too: the id never comes back, so a caller cannot make the agent resolve
    /// it again per connection.
    fn resolve(&self, cgroup_id: CgroupId) -> LimitKey {
        self.cgroups
            .path_of(cgroup_id)
            .ok()
            .and_then(|path| parse_pod_cgroup(path.as_str()))
            .map_or(LimitKey::Cgroup(cgroup_id), |pod| {
                LimitKey::Pod(Arc::new(pod.pod_uid))
            })
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<CgroupId, LimitKey>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// The agent's whole share (`--max-connections`) is open.
    Global,
    /// The caller holds its share (`--max-connections-per-pod`).
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

/// Counts of open connections. Unattributed connections (key `None`) share one count: they are all
/// refused, and none of them may crowd out attributed callers beyond its own share.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: NonZeroU32,
    max_per_caller: NonZeroU32,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: u32,
    by_caller: HashMap<Option<LimitKey>, u32>,
}

impl ConnectionLimits {
    pub fn new(max_total: NonZeroU32, max_per_caller: NonZeroU32) -> Self {
        Self {
            max_total,
            max_per_caller,
            open: Mutex::new(OpenConnections::default()),
        }
    }

    /// Counts a new connection of `caller`; it stays counted until the returned guard drops.
    pub fn admit(self: &Arc<Self>, caller: Option<LimitKey>) -> Result<OpenConnection, OverLimit> {
        let mut open = self.lock();
        if open.total >= self.max_total.get() {
            return Err(OverLimit::Global);
        }
        let held = open.by_caller.entry(caller.clone()).or_default();
        if *held >= self.max_per_caller.get() {
            return Err(OverLimit::Caller);
        }
        *held += 1;
        open.total += 1;
        Ok(OpenConnection {
            limits: self.clone(),
            caller,
        })
    }

    fn release(&self, caller: &Option<LimitKey>) {
        let mut open = self.lock();
        open.total -= 1;
        if let Some(held) = open.by_caller.get_mut(caller) {
            *held -= 1;
            if *held == 0 {
                open.by_caller.remove(caller);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct OpenConnection {
    limits: Arc<ConnectionLimits>,
    caller: Option<LimitKey>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.limits.release(&self.caller);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::identity::{CgroupError, CgroupPath};

    const POD_UID: &str = "9ac48755-3968-48e4-b9dc-6d4b69f3bb42";

    fn count(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn pod() -> LimitKey {
        LimitKey::Pod(Arc::new(PodUid::parse(POD_UID).unwrap()))
    }

    #[test]
    fn each_caller_has_its_own_share_and_all_share_the_total() {
        let limits = Arc::new(ConnectionLimits::new(count(5), count(2)));
        let (a, b) = (Some(pod()), Some(LimitKey::Cgroup(CgroupId(2))));
        let first = limits.admit(a.clone()).unwrap();
        let _second = limits.admit(a.clone()).unwrap();
        assert_eq!(limits.admit(a.clone()).unwrap_err(), OverLimit::Caller);
        let _b1 = limits.admit(b.clone()).unwrap();
        let _b2 = limits.admit(b).unwrap();
        let _unattributed = limits.admit(None).unwrap();
        let other = Some(LimitKey::Cgroup(CgroupId(3)));
        assert_eq!(limits.admit(other).unwrap_err(), OverLimit::Global);
        drop(first);
        assert!(limits.admit(a).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn released_callers_leave_no_entry_behind() {
        let limits = Arc::new(ConnectionLimits::new(count(10), count(10)));
        for id in 0..5 {
            drop(limits.admit(Some(LimitKey::Cgroup(CgroupId(id)))).unwrap());
        }
        let open = limits.lock();
        assert_eq!((open.total, open.by_caller.len()), (0, 0));
    }

    /// Two containers of one pod (systemd driver), a node daemon, and counts of path resolutions.
    #[derive(Default)]
    struct Cgroups {
        resolved: AtomicUsize,
    }

    impl CgroupResolver for Cgroups {
        fn path_of(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError> {
            self.resolved.fetch_add(1, Ordering::SeqCst);
            let pod = format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                POD_UID.replace('-', "_")
            );
            match cgroup_id.0 {
                1 => Ok(CgroupPath::new(&format!(
                    "{pod}/cri-containerd-{}.scope",
                    "a".repeat(64)
                ))),
                2 => Ok(CgroupPath::new(&format!(
                    "{pod}/cri-containerd-{}.scope",
                    "b".repeat(64)
                ))),
                3 => Ok(CgroupPath::new("system.slice/billing.service")),
                other => Err(CgroupError::UnknownId(other)),
            }
        }
    }

    #[test]
    fn a_pods_containers_share_its_key_and_other_cgroups_are_their_own() {
        let cgroups = Arc::new(Cgroups::default());
        let keys = LimitKeys::new(cgroups.clone(), NonZeroUsize::new(16).unwrap());
        assert_eq!(keys.key_of(CgroupId(1)), pod());
        assert_eq!(keys.key_of(CgroupId(2)), pod());
        assert_eq!(keys.key_of(CgroupId(3)), LimitKey::Cgroup(CgroupId(3)));
        assert_eq!(keys.key_of(CgroupId(4)), LimitKey::Cgroup(CgroupId(4)), "gone");
        for id in 1..=4 {
            keys.key_of(CgroupId(id));
        }
        assert_eq!(
            cgroups.resolved.load(Ordering::SeqCst),
            4,
            "each cgroup resolved once, an unreadable one too"
        );
    }

    #[test]
    fn keys_stay_within_their_capacity() {
        let keys = LimitKeys::new(Arc::new(Cgroups::default()), NonZeroUsize::new(2).unwrap());
        for id in 10..1010 {
            keys.key_of(CgroupId(id));
        }
        assert_eq!(keys.lock().len(), 2);
    }
}
