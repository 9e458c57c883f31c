//! workload::kube::index: the node's pods by the UID their cgroups are named by (the pod's own UID, or
//! a static pod's config hash from its mirror pod), rebuilt from the pod reflector's store after each
//! change, and the bounded wait for a pod the API server has not delivered yet. Pods deleted recently
//! are remembered, so a request from a container that outlives its pod is refused at once instead of
//! waiting.

use std::{
    collections::{HashMap, HashSet},
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
    by_uid: RwLock<HashMap<PodUid, Entry>>,
    deleted: Mutex<LruCache<PodUid, ()>>,
    /// Bumped on every change, so waiters look again.
    changes: watch::Sender<u64>,
    metrics: KubeMetrics,
}

/// What a cgroup's pod UID names.
#[derive(Clone)]
enum Entry {
    Pod(Arc<Pod>),
    /// A static pod's hash that more than one pod object claims as its mirror. The mirror annotation is
    /// an ordinary annotation that anyone who can create pods may write: a second claim must not give
    /// the static pod's containers another pod's role, so the hash names nobody until one claim is left.
    Contested,
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

    /// Follows one event of the pod reflector, after its store took it: the index is rebuilt from the
    /// store (a node has at most a few hundred pods), so it is exactly what the store holds.
    pub fn apply(&self, event: &watcher::Event<Pod>, store: &Store<Pod>) {
        match event {
            watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone => {}
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        }
        let pods = store.state();
        self.metrics.set_pods(pods.len());
        let fresh = index(&pods);
        let mut by_uid = self.by_uid.write().unwrap_or_else(|e| e.into_inner());
        let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        // Gone from the store: deleted, whether the watch said so or a re-list showed it.
        for gone in by_uid.keys().filter(|uid| !fresh.contains_key(*uid)) {
            deleted.put(gone.clone(), ());
        }
        *by_uid = fresh;
        drop((by_uid, deleted));
        self.changes.send_modify(|count| *count = count.wrapping_add(1));
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
        let entry = self
            .by_uid
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned();
        match entry {
            Some(Entry::Pod(pod)) => return Ok(Some(pod)),
            Some(Entry::Contested) => return Err(WorkloadError::MirrorContested { uid: uid.clone() }),
            None => {}
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
}

/// Every pod by its own UID, and by its mirror hash when exactly one pod claims that hash and no pod has
/// it as its own UID.
fn index(pods: &[Arc<Pod>]) -> HashMap<PodUid, Entry> {
    let mut by_uid: HashMap<PodUid, Entry> = pods
        .iter()
        .filter_map(|pod| {
            Some((
                PodUid::parse(pod.metadata.uid.as_deref()?)?,
                Entry::Pod(pod.clone()),
            ))
        })
        .collect();
    let own_uids: HashSet<PodUid> = by_uid.keys().cloned().collect();
    for pod in pods {
        let Some(hash) = mirror_hash(pod) else { continue };
        if own_uids.contains(&hash) {
            continue;
        }
        by_uid
            .entry(hash)
            .and_modify(|entry| *entry = Entry::Contested)
            .or_insert_with(|| Entry::Pod(pod.clone()));
    }
    by_uid
}

/// The static pod a mirror pod names: the kubelet's config hash, 32 hex digits. A UUID-shaped value is
/// no hash the kubelet makes, and it is the shape of every other pod's UID (the API server makes them):
/// a claim to a pod deleted while its containers run on through their grace period would hand them
/// the claimant's role.
fn mirror_hash(pod: &Pod) -> Option<PodUid> {
    let hash = pod.metadata.annotations.as_ref()?.get(MIRROR_KEY)?;
    if hash.contains('-') {
        return None;
    }
    PodUid::parse(hash)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::reflector;

    use super::*;

    const HASH: &str = "6a9a5f6a0f2c2f2a0f2d0c4d0c1a1d2e";

    fn pod(name: &str, uid: &str, mirror: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("kube-system".to_owned()),
                uid: Some(uid.to_owned()),
                annotations: mirror.map(|hash| [(MIRROR_KEY.to_owned(), hash.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A store and an index fed the same events, as the reflector feeds them.
    struct Fed {
        writer: reflector::store::Writer<Pod>,
        store: Store<Pod>,
        index: PodIndex,
    }

    impl Fed {
        fn new() -> Self {
            let writer = reflector::store::Writer::default();
            let store = writer.as_reader();
            let mut fed = Self {
                writer,
                store,
                index: PodIndex::new(KubeMetrics::default()),
            };
            fed.send(watcher::Event::Init);
            fed.send(watcher::Event::InitDone);
            fed
        }

        fn send(&mut self, event: watcher::Event<Pod>) {
            self.writer.apply_watcher_event(&event);
            self.index.apply(&event, &self.store);
        }

        fn name_of(&self, uid: &str) -> Result<Option<String>, String> {
            self.index
                .lookup(&PodUid::parse(uid).unwrap())
                .map(|found| found.and_then(|pod| pod.metadata.name.clone()))
                .map_err(|err| err.to_string())
        }
    }

    #[test]
    fn a_static_pod_is_found_by_its_mirrors_hash_until_a_second_pod_claims_it() {
        let mut fed = Fed::new();
        let mirror = pod("proxy", "11111111-1111-4111-8111-111111111111", Some(HASH));
        fed.send(watcher::Event::Apply(mirror));
        assert_eq!(fed.name_of(HASH), Ok(Some("proxy".to_owned())));

        let claimant = pod("claimant", "22222222-2222-4222-8222-222222222222", Some(HASH));
        fed.send(watcher::Event::Apply(claimant.clone()));
        let contested = fed.name_of(HASH).unwrap_err();
        assert!(contested.contains("more than one pod"), "{contested}");
        assert_eq!(
            fed.name_of("22222222-2222-4222-8222-222222222222"),
            Ok(Some("claimant".to_owned())),
            "the claimant is still itself"
        );

        fed.send(watcher::Event::Delete(claimant));
        assert_eq!(fed.name_of(HASH), Ok(Some("proxy".to_owned())), "one claim left");
    }

    #[test]
    fn a_mirror_annotation_never_takes_another_pods_own_uid() {
        let mut fed = Fed::new();
        // An own UID of the hashes' shape, so that it is the index's check of own UIDs, not the shape
        // of the claim, that keeps the thief out.
        let victim = "33333333333343338333333333333333";
        fed.send(watcher::Event::Apply(pod("victim", victim, None)));
        fed.send(watcher::Event::Apply(pod(
            "thief",
            "44444444-4444-4444-8444-444444444444",
            Some(victim),
        )));
        assert_eq!(fed.name_of(victim), Ok(Some("victim".to_owned())));
    }

    #[test]
    fn a_mirror_annotation_shaped_like_a_pod_uid_claims_nothing_not_even_a_deleted_pods() {
        let mut fed = Fed::new();
        let victim = "88888888-8888-4888-8888-888888888888";
        let claimant = pod("claimant", "99999999-9999-4999-8999-999999999999", Some(victim));
        fed.send(watcher::Event::Apply(pod("victim", victim, None)));
        // Its containers run on through their grace period: what they ask must not reach the claimant.
        fed.send(watcher::Event::Delete(pod("victim", victim, None)));
        fed.send(watcher::Event::Apply(claimant));
        assert!(fed.name_of(victim).unwrap_err().contains("deleted"));

        // An agent that never saw the deletion (it restarted since) knows nothing of it.
        let mut restarted = Fed::new();
        restarted.send(watcher::Event::Apply(pod(
            "claimant",
            "99999999-9999-4999-8999-999999999999",
            Some(victim),
        )));
        assert_eq!(restarted.name_of(victim), Ok(None));
    }

    #[test]
    fn pods_gone_from_the_store_are_deleted_whether_watched_or_relisted() {
        let mut fed = Fed::new();
        let (watched, relisted) = (
            "55555555-5555-4555-8555-555555555555",
            "66666666-6666-4666-8666-666666666666",
        );
        fed.send(watcher::Event::Apply(pod("watched", watched, None)));
        fed.send(watcher::Event::Apply(pod("relisted", relisted, None)));
        fed.send(watcher::Event::Delete(pod("watched", watched, None)));
        assert!(fed.name_of(watched).unwrap_err().contains("deleted"));
        // A re-list that no longer has the other pod: deleted while the watch was away.
        fed.send(watcher::Event::Init);
        assert_eq!(
            fed.name_of(relisted),
            Ok(Some("relisted".to_owned())),
            "kept until the list is done"
        );
        fed.send(watcher::Event::InitDone);
        assert!(fed.name_of(relisted).unwrap_err().contains("deleted"));
        assert_eq!(
            fed.name_of("77777777-7777-4777-8777-777777777777"),
            Ok(None),
            "never seen: not known"
        );
    }
}
