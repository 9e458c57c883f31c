//! imds::limits: who shares a limit ([`LimitKey`]: a pod, or outside pods a cgroup), and bounds on
//! the metadata connections open at once, over all callers and per caller, so that one workload
//! flooding the agent can neither starve the others nor run the agent out of file descriptors. The
//! last quarter of the total is a reserve that only callers holding fewer than
//! [`GUARANTEED_CONNECTIONS`] may draw on, so that pods holding their whole share cannot starve a
//! pod that holds none. A connection over a bound is closed at accept, before a byte is read, and
//! while a pod holds all its connections the kernel refuses its containers' further connects
//! ([`ConnectGate`]), so that a pod reconnecting in a loop costs the agent nothing. The request rate
//! per caller is [`super::rate`]'s.

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

/// Connections every caller may open however many the others hold, as long as the reserve (the last
/// quarter of the total) lasts: an SDK holds one or two while it fetches credentials. At the defaults
/// the reserve holds 256 callers' worth, more than the 250 pods an EKS node runs with prefix
/// delegation (110 without).
pub const GUARANTEED_CONNECTIONS: u32 = 4;

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
    /// Only the reserve is left, and the caller holds its guarantee already.
    Reserved,
}

impl OverLimit {
    pub fn label(self) -> &'static str {
        match self {
            OverLimit::Global => "global_limit",
            OverLimit::Caller => "caller_limit",
            OverLimit::Reserved => "reserved",
        }
    }
}

/// Where the kernel refuses a cgroup's connects to the metadata endpoints at `connect()`: the BPF
/// programs' `OVER_LIMIT_CGROUPS`.
pub trait ConnectGate: Send + Sync {
    /// Refuses (`true`), or allows again, the connects of `cgroup_id`.
    fn set_over_limit(&self, cgroup_id: CgroupId, over: bool);
}

/// Counts of open connections. Unattributed connections (key `None`) share one count: they are all
/// refused, and none of them may crowd out attributed callers beyond its own share.
pub struct ConnectionLimits {
    max_total: NonZeroU32,
    max_per_caller: NonZeroU32,
    /// Open connections from which on only callers holding fewer than `guaranteed` are admitted.
    reserve_from: u32,
    guaranteed: u32,
    gate: Option<Arc<dyn ConnectGate>>,
    open: Mutex<OpenConnections>,
}

impl std::fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("max_total", &self.max_total)
            .field("max_per_caller", &self.max_per_caller)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct OpenConnections {
    total: u32,
    by_caller: HashMap<Option<LimitKey>, u32>,
    /// The cgroups the gate refuses, by the caller whose share they filled.
    gated: HashMap<LimitKey, Vec<CgroupId>>,
}

impl ConnectionLimits {
    pub fn new(max_total: NonZeroU32, max_per_caller: NonZeroU32) -> Self {
        Self {
            max_total,
            max_per_caller,
            reserve_from: max_total.get() - max_total.get() / 4,
            guaranteed: GUARANTEED_CONNECTIONS.min(max_per_caller.get()),
            gate: None,
            open: Mutex::new(OpenConnections::default()),
        }
    }

    /// From now on a connection over its caller's share also closes `gate` to the cgroup that made it,
    /// until the caller is down to half its share.
    pub fn with_gate(mut self, gate: Arc<dyn ConnectGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Counts a new connection of `caller`, made by `cgroup_id`; it stays counted until the returned
    /// guard drops. Refused when all are open, when the caller holds its share, or when only the
    /// reserve is left and the caller holds its guarantee.
    pub fn admit(
        self: &Arc<Self>,
        caller: Option<LimitKey>,
        cgroup_id: Option<CgroupId>,
    ) -> Result<OpenConnection, OverLimit> {
        let mut open = self.lock();
        let total = open.total;
        if total >= self.max_total.get() {
            return Err(OverLimit::Global);
        }
        let held = open.by_caller.entry(caller.clone()).or_default();
        if *held >= self.max_per_caller.get() {
            if let (Some(gate), Some(caller), Some(cgroup_id)) = (&self.gate, caller, cgroup_id) {
                let gated = open.gated.entry(caller).or_default();
                if !gated.contains(&cgroup_id) {
                    gated.push(cgroup_id);
                    gate.set_over_limit(cgroup_id, true);
                }
            }
            return Err(OverLimit::Caller);
        }
        if total >= self.reserve_from && *held >= self.guaranteed {
            return Err(OverLimit::Reserved);
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
        let Some(held) = open.by_caller.get_mut(caller) else {
            return;
        };
        *held -= 1;
        let held = *held;
        if held == 0 {
            open.by_caller.remove(caller);
        }
        // Half, not one below the share: a caller that reconnects in a loop is let through once per
        // half share of its connections ending, not once per connection.
        if held <= self.max_per_caller.get() / 2
            && let (Some(gate), Some(key)) = (&self.gate, caller)
            && let Some(cgroups) = open.gated.remove(key)
        {
            for cgroup_id in cgroups {
                gate.set_over_limit(cgroup_id, false);
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
        let first = limits.admit(a.clone(), None).unwrap();
        let _second = limits.admit(a.clone(), None).unwrap();
        assert_eq!(limits.admit(a.clone(), None).unwrap_err(), OverLimit::Caller);
        let _b1 = limits.admit(b.clone(), None).unwrap();
        let _b2 = limits.admit(b, None).unwrap();
        let _unattributed = limits.admit(None, None).unwrap();
        let other = Some(LimitKey::Cgroup(CgroupId(3)));
        assert_eq!(limits.admit(other, None).unwrap_err(), OverLimit::Global);
        drop(first);
        assert!(
            limits.admit(a, None).is_ok(),
            "a closed connection frees its place"
        );
    }

    /// Opens connections for `caller` until one is refused; returns them and why the next was not.
    fn hold_all(limits: &Arc<ConnectionLimits>, caller: &LimitKey) -> (Vec<OpenConnection>, OverLimit) {
        let mut held = Vec::new();
        loop {
            match limits.admit(Some(caller.clone()), None) {
                Ok(open) => held.push(open),
                Err(over) => return (held, over),
            }
        }
    }

    #[test]
    fn past_three_quarters_of_the_total_only_callers_below_their_guarantee_are_admitted() {
        let limits = Arc::new(ConnectionLimits::new(count(16), count(8)));
        let caller = |id| LimitKey::Cgroup(CgroupId(id));
        let (first, over) = hold_all(&limits, &caller(1));
        assert_eq!((first.len(), over), (8, OverLimit::Caller));
        let (second, over) = hold_all(&limits, &caller(2));
        assert_eq!(
            (second.len(), over),
            (4, OverLimit::Reserved),
            "past 12 open, the second holds its guarantee and no more"
        );
        let (newcomer, over) = hold_all(&limits, &caller(3));
        assert_eq!((newcomer.len(), over), (4, OverLimit::Global));
        drop(first);
        let (more, over) = hold_all(&limits, &caller(2));
        assert_eq!(
            (more.len(), over),
            (4, OverLimit::Caller),
            "below the reserve again, its whole share"
        );
    }

    #[test]
    fn at_the_defaults_every_pod_of_a_full_node_gets_its_guarantee_however_many_others_hold() {
        let limits = Arc::new(ConnectionLimits::new(
            DEFAULT_MAX_CONNECTIONS,
            DEFAULT_MAX_CONNECTIONS_PER_POD,
        ));
        // 250 pods (EKS with prefix delegation), one after the other, each holding all it may: without
        // the reserve, the first 32 would fill the 4,096 and the other 218 get nothing.
        let held: Vec<Vec<OpenConnection>> = (0..250)
            .map(|id| hold_all(&limits, &LimitKey::Cgroup(CgroupId(id))).0)
            .collect();
        let counts: Vec<usize> = held.iter().map(Vec::len).collect();
        assert_eq!(counts[..24], [128; 24], "the first pods, their whole share");
        assert!(
            counts[24..].iter().all(|&n| n == GUARANTEED_CONNECTIONS as usize),
            "every other pod, its guarantee: {counts:?}"
        );
        assert!(limits.lock().total <= DEFAULT_MAX_CONNECTIONS.get());
    }

    /// Records what the limits ask of the kernel's gate.
    #[derive(Default)]
    struct Gate(Mutex<Vec<(u64, bool)>>);

    impl ConnectGate for Gate {
        fn set_over_limit(&self, cgroup_id: CgroupId, over: bool) {
            self.0.lock().unwrap().push((cgroup_id.0, over));
        }
    }

    #[test]
    fn a_caller_over_its_share_is_gated_in_the_kernel_until_half_its_share_is_free() {
        let gate = Arc::new(Gate::default());
        let limits = Arc::new(ConnectionLimits::new(count(100), count(4)).with_gate(gate.clone()));
        let open: Vec<_> = (0..4)
            .map(|_| limits.admit(Some(pod()), Some(CgroupId(1))).unwrap())
            .collect();
        // Both containers of the pod hit the share, each once gated however often it retries.
        for cgroup_id in [1, 2, 2] {
            let refused = limits.admit(Some(pod()), Some(CgroupId(cgroup_id)));
            assert_eq!(refused.unwrap_err(), OverLimit::Caller);
        }
        assert_eq!(*gate.0.lock().unwrap(), [(1, true), (2, true)]);
        let mut open = open.into_iter();
        drop(open.next());
        assert_eq!(gate.0.lock().unwrap().len(), 2, "3 of 4 still open: still gated");
        drop(open.next());
        assert_eq!(
            gate.0.lock().unwrap()[2..],
            [(1, false), (2, false)],
            "half the share free: both open again"
        );
        assert!(limits.lock().gated.is_empty());
    }

    #[test]
    fn released_callers_leave_no_entry_behind() {
        let limits = Arc::new(ConnectionLimits::new(count(10), count(10)));
        for id in 0..5 {
            drop(limits.admit(Some(LimitKey::Cgroup(CgroupId(id))), None).unwrap());
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
