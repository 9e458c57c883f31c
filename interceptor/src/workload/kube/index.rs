//! workload::kube::index: the node's pods by the UID their cgroups are named by (the pod's own UID, or
//! a static pod's config hash from its mirror pod), kept in step with the pod reflector's store, and the
//! bounded wait for a pod the API server has not delivered yet. Pods deleted recently are remembered,
//! so a request from a container that outlives its pod is refused at once instead of waiting.

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{reflector::Store, watcher};
use lru::LruCache;
use tokio::sync::watch;

use super::{KubeMetrics, MIRROR_KEY};
use crate::{identity::PodUid, workload::WorkloadError};

/// Deleted pods remembered (UIDs never come back, so this only decides how long "deleted" beats
/// "not known yet").
const DELETED_REMEMBERED: NonZeroUsize = NonZeroUsize::new(4096).expect("non-zero");

pub struct PodIndex {
    by_uid: RwLock<HashMap<PodUid, Arc<Pod>>>,
    deleted: Mutex<LruCache<PodUid, ()>>,
    /// Bumped on every change, so waiters look again.
    changes: watch::Sender<u64>,
    metrics: KubeMetrics,
}

impl PodIndex {
    pub fn new(metrics: KubeMetrics) -> Self {
        Self {
            by_uid: RwLock::default(),
            deleted: Mutex::new(LruCache::new(DELETED_REMEMBERED)),
            changes: watch::Sender::new(0),
            metrics,
        }
    }

    /// Follows one event of the pod reflector, after its store took it.
    pub fn apply(&self, event: &watcher::Event<Pod>, store: &Store<Pod>) {
        match event {
            watcher::Event::Apply(pod) => {
                let stored = store
                    .get(&kube::runtime::reflector::ObjectRef::from_obj(pod))
                    .unwrap_or_else(|| Arc::new(pod.clone()));
                let mut index = self.write();
                for uid in uids_of(&stored) {
                    index.insert(uid, stored.clone());
                }
            }
            watcher::Event::Delete(pod) => {
                let mut index = self.write();
                let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
                for uid in uids_of(pod) {
                    index.remove(&uid);
                    deleted.put(uid, ());
                }
            }
            watcher::Event::InitDone => self.replace(store.state()),
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        }
        self.metrics.set_pods(self.write().len());
        self.changes.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// After a (re-)list: the store is the truth; pods that were known and are gone were deleted while
    /// the watch was away.
    fn replace(&self, pods: Vec<Arc<Pod>>) {
        let fresh: HashMap<PodUid, Arc<Pod>> = pods
            .into_iter()
            .flat_map(|pod| uids_of(&pod).into_iter().map(move |uid| (uid, pod.clone())))
            .collect();
        let mut index = self.write();
        let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        for gone in index.keys().filter(|uid| !fresh.contains_key(*uid)) {
            deleted.put(gone.clone(), ());
        }
        *index = fresh;
    }

    /// The pod named `uid`, waiting up to `wait` for the reflector to deliver it when it is not known
    /// yet (a container may start, and ask, before the watch event reaches this node's agent).
    pub async fn wait_for(&self, uid: &PodUid, wait: Duration) -> Result<Arc<Pod>, WorkloadError> {
        let mut changes = self.changes.subscribe();
        if let Some(found) = self.lookup(uid)? {
            return Ok(found);
        }
        tracing::debug!(pod_uid = %uid, ?wait, "pod not known yet; waiting for it");
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        let outcome = loop {
            if !matches!(
                tokio::time::timeout_at(deadline, changes.changed()).await,
                Ok(Ok(()))
            ) {
                break Err(WorkloadError::PodNotKnown {
                    uid: uid.clone(),
                    waited: started.elapsed(),
                });
            }
            if let Some(decided) = self.lookup(uid).transpose() {
                break decided;
            }
        };
        let label = match &outcome {
            Ok(_) => "found",
            Err(WorkloadError::PodDeleted { .. }) => "deleted",
            Err(_) => "timed_out",
        };
        self.metrics.waited(label, started.elapsed());
        outcome
    }

    fn lookup(&self, uid: &PodUid) -> Result<Option<Arc<Pod>>, WorkloadError> {
        if let Some(found) = self.by_uid.read().unwrap_or_else(|e| e.into_inner()).get(uid) {
            return Ok(Some(found.clone()));
        }
        let deleted = self
            .deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(uid);
        if deleted {
            return Err(WorkloadError::PodDeleted { uid: uid.clone() });
        }
        Ok(None)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PodUid, Arc<Pod>>> {
        self.by_uid.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UIDs a pod's cgroups may be named by: its own, and for a mirror pod its static pod's hash.
fn uids_of(pod: &Pod) -> Vec<PodUid> {
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(MIRROR_KEY));
    [pod.metadata.uid.as_ref(), mirror]
        .into_iter()
        .flatten()
        .filter_map(|uid| PodUid::parse(uid))
        .collect()
}
