//! workload::kube: the node's pods from the Kubernetes API, as a [`WorkloadSource`]. kube-runtime
//! reflectors keep the pods scheduled to this node (and, when the rules need them, the namespaces and
//! ServiceAccounts) in memory, listed in small pages and stripped as they arrive to the fields the
//! rules read, each annotation cut to its limit; [`index`] finds a pod by the UID
//! in its cgroup path and waits, bounded, for one the API server has not delivered yet; the pod's
//! annotations become its [`RoleRequest`]; [`events`] tells the pod's owners, through Kubernetes
//! Events, why it was refused.

mod events;
mod index;
mod metrics;

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, PodSpec, PodStatus, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;

pub use self::metrics::KubeMetrics;
use self::{events::PodEvents, index::PodIndex};
use super::{PodRef, Refusal, Workload, WorkloadError, WorkloadSource};
use crate::{
    identity::{CgroupPath, parse_pod_cgroup},
    policy::{
        AllowedRoles, BaseArn, Limit, MAX_RESTRICTION_CHARS, PatternFormat, RequestedTags, RoleRequest,
        tags::{PodNames, SessionTagging, SessionTags},
    },
};

/// The annotation a pod (or ServiceAccount) names its STS session with (kiam's).
pub const SESSION_NAME_KEY: &str = "iam.amazonaws.com/session-name";
/// The annotation the kubelet puts on a static pod's mirror: the hash its cgroup is named by.
const MIRROR_KEY: &str = "kubernetes.io/config.mirror";
/// More than any pod UID (36 characters) or config hash (32) the mirror annotation may name.
const MIRROR_MAX_CHARS: usize = 64;
/// Objects per page of a reflector's list. The watcher holds a page whole (the response's text, then
/// its objects, until each is stripped): at the API server's 256 KiB of annotations per object, about
/// 6 MiB of text and as much again parsed. kube-runtime's default of 500 would be 125 MiB.
const LIST_PAGE_SIZE: u32 = 25;
/// The ServiceAccount of a pod that names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How the node's pods are turned into workloads: the agent's Kubernetes flags.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// Only pods with this `spec.nodeName` are watched.
    pub node: String,
    /// Pod annotation naming the role (`--iam-role-key`).
    pub role_key: Arc<str>,
    /// Pod annotation naming the external id (`--iam-external-id`).
    pub external_id_key: Arc<str>,
    /// A pod without a role annotation takes its ServiceAccount's (`--serviceaccount-roles`).
    pub serviceaccount_roles: bool,
    /// Namespace restrictions: the namespace annotation and how its patterns are written.
    pub namespace_restrictions: Option<(Arc<str>, PatternFormat)>,
    /// How long a request from a pod the API server has not delivered yet waits for it.
    pub pod_wait: Duration,
    /// What restriction patterns that are role names are joined to.
    pub base_arn: Option<BaseArn>,
    /// How pods' sessions are tagged (`--session-tags`); `None` sends no tags.
    pub session_tags: Option<SessionTagging>,
}

/// The node's pods, namespaces and ServiceAccounts, as the reflectors last saw them.
pub struct KubeWorkloads {
    client: Client,
    settings: KubeSettings,
    pods: Arc<PodIndex>,
    pod_store: Store<Pod>,
    namespaces: Option<Store<Namespace>>,
    service_accounts: Option<Store<ServiceAccount>>,
    /// Each namespace's parsed restriction, kept while its annotation is unchanged.
    restrictions: std::sync::Mutex<HashMap<String, Arc<AllowedRoles>>>,
    events: PodEvents,
    metrics: KubeMetrics,
    synced: tokio::sync::watch::Receiver<bool>,
}

impl KubeWorkloads {
    /// Starts the reflectors (pods of `settings.node`; namespaces and ServiceAccounts only when the
    /// rules read them). They run, and resume after API server trouble, until the runtime ends.
    pub fn start(client: Client, settings: KubeSettings) -> Arc<Self> {
        let metrics = KubeMetrics::default();
        let pods = Arc::new(PodIndex::new(metrics.clone()));
        let pod_watch = list_config().fields(&format!("spec.nodeName={}", settings.node));
        let pod_keys: Vec<Kept> = request_annotations(&settings)
            .into_iter()
            .chain([Kept::new(MIRROR_KEY.into(), MIRROR_MAX_CHARS)])
            .collect();
        let (pod_store, pods_synced) = spawn_reflector(
            Api::<Pod>::all(client.clone()),
            pod_watch,
            move |pod: &mut Pod| slim_pod(pod, &pod_keys),
            ReflectorLabels::new("pods", &metrics),
            {
                let pods = pods.clone();
                move |event, store| pods.apply(event, store)
            },
        );
        let mut listed = vec![pods_synced];
        let namespaces = settings.namespace_restrictions.as_ref().map(|(key, _)| {
            let keys = [Kept::new(key.clone(), MAX_RESTRICTION_CHARS)];
            let (store, synced) = spawn_reflector(
                Api::<Namespace>::all(client.clone()),
                list_config(),
                move |namespace: &mut Namespace| {
                    slim_meta(&mut namespace.metadata, &keys);
                    namespace.spec = None;
                    namespace.status = None;
                },
                ReflectorLabels::new("namespaces", &metrics),
                |_, _| {},
            );
            listed.push(synced);
            store
        });
        let service_accounts = settings.serviceaccount_roles.then(|| {
            let keys = request_annotations(&settings);
            let (store, synced) = spawn_reflector(
                Api::<ServiceAccount>::all(client.clone()),
                list_config(),
                move |account: &mut ServiceAccount| {
                    slim_meta(&mut account.metadata, &keys);
                    account.secrets = None;
                    account.image_pull_secrets = None;
                },
                ReflectorLabels::new("serviceaccounts", &metrics),
                |_, _| {},
            );
            listed.push(synced);
            store
        });
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            for store in &mut listed {
                let _ = store.wait_for(|listed| *listed).await;
            }
            synced_tx.send_replace(true);
        });
        Arc::new(Self {
            events: PodEvents::new(client.clone(), &settings.node, metrics.clone()),
            client,
            settings,
            pods,
            pod_store,
            namespaces,
            service_accounts,
            restrictions: Default::default(),
            metrics,
            synced,
        })
    }

    pub fn metrics(&self) -> &KubeMetrics {
        &self.metrics
    }

    /// Returns once every reflector has listed its objects once.
    pub async fn synced(&self) {
        let _ = self.synced.clone().wait_for(|synced| *synced).await;
    }

    /// The client the reflectors use, for the agent's other calls to the API server.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The node this source serves the pods of.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// Whether every reflector has listed its objects once.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// The node's pods as the reflector holds them, each with the workload it is, or why it is none.
    pub fn pods(&self) -> Vec<(PodRef, Result<Arc<Workload>, WorkloadError>)> {
        self.pod_store
            .state()
            .iter()
            .map(|pod| (pod_ref(pod), self.workload_of(pod)))
            .collect()
    }

    /// What `pod` asks for: its own role annotation, else (with ServiceAccount roles) its
    /// ServiceAccount's, else the default role. The object that names the role also gives the external
    /// id and session name.
    fn workload_of(&self, pod: &Pod) -> Result<Arc<Workload>, WorkloadError> {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        if let Some(phase @ ("Succeeded" | "Failed")) = pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            return Err(WorkloadError::PodFinished {
                pod: format!("{namespace}/{name}"),
                phase: phase.to_owned(),
            });
        }
        let account;
        let (annotations, origin) = match self.service_account_naming_a_role(pod)? {
            Some(found) => {
                account = found;
                let account_name = account.metadata.name.as_deref().unwrap_or_default();
                (
                    &account.metadata.annotations,
                    format!("serviceaccount {namespace}/{account_name}"),
                )
            }
            None => (&meta.annotations, format!("pod {namespace}/{name}")),
        };
        let annotation = |key: &str| annotations.as_ref().and_then(|all| all.get(key)).cloned();
        let role = annotation(&self.settings.role_key);
        let pod = pod_ref(pod);
        let request = RoleRequest {
            allowed: role.as_ref().and_then(|_| self.restriction(&namespace)),
            role,
            external_id: annotation(&self.settings.external_id_key),
            session_name: annotation(SESSION_NAME_KEY),
            origin: Some(format!("annotation {} of {origin}", self.settings.role_key).into()),
            tags: self.session_tags_of(&pod),
        };
        Ok(Arc::new(Workload {
            session_name: session_name(&namespace, &name),
            name: format!("{namespace}/{name}"),
            request,
            pod: Some(pod),
        }))
    }

    /// The pod's session tags with `--session-tags`, none without.
    fn session_tags_of(&self, pod: &PodRef) -> RequestedTags {
        let Some(tagging) = &self.settings.session_tags else {
            return RequestedTags::default();
        };
        let names = PodNames {
            namespace: &pod.namespace,
            service_account: &pod.service_account,
            name: &pod.name,
            uid: &pod.uid,
        };
        RequestedTags(SessionTags::for_pod(tagging, names))
    }

    /// The pod's ServiceAccount, when ServiceAccount roles are on, the pod names no role itself and the
    /// account does.
    /// A ServiceAccount the store does not hold is an error, not "names no role": until it is
    /// listed, the pod would otherwise get what a pod naming no role gets (the default role, or the
    /// node's credentials by the node-credentials setting) in place of the account's role.
    fn service_account_naming_a_role(&self, pod: &Pod) -> Result<Option<Arc<ServiceAccount>>, WorkloadError> {
        let Some(accounts) = self.service_accounts.as_ref() else {
            return Ok(None);
        };
        let has_role = |annotations: &Option<std::collections::BTreeMap<String, String>>| {
            annotations
                .as_ref()
                .is_some_and(|all| all.contains_key(&*self.settings.role_key))
        };
        if has_role(&pod.metadata.annotations) {
            return Ok(None);
        }
        let name = service_account_of(pod);
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let account = accounts
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or_else(|| WorkloadError::ServiceAccountNotKnown {
                pod: format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or_default()),
                account: format!("{namespace}/{name}"),
            })?;
        Ok(has_role(&account.metadata.annotations).then_some(account))
    }

    /// The namespace's restriction on the roles its pods name, when restrictions are on. A namespace
    /// the reflector has not seen allows nothing.
    fn restriction(&self, namespace: &str) -> Option<Arc<AllowedRoles>> {
        let (key, format) = self.settings.namespace_restrictions.as_ref()?;
        let annotation = self
            .namespaces
            .as_ref()?
            .get(&ObjectRef::new(namespace))
            .and_then(|found| found.metadata.annotations.as_ref()?.get(&**key).cloned());
        let mut parsed = self.restrictions.lock().unwrap_or_else(|e| e.into_inner());
        let text = annotation.as_deref().unwrap_or_default().trim();
        if let Some(cached) = parsed.get(namespace).filter(|cached| cached.text() == text) {
            return Some(cached.clone());
        }
        let allowed = Arc::new(AllowedRoles::parse(
            namespace,
            key.clone(),
            annotation.as_deref(),
            *format,
            self.settings.base_arn.as_ref(),
        ));
        if let Some(problem) = allowed.problem() {
            tracing::warn!(
                namespace,
                key = &**key,
                problem,
                "namespace restriction is not valid: its pods get no role they name"
            );
        }
        parsed.insert(namespace.to_owned(), allowed.clone());
        Some(allowed)
    }
}

#[async_trait::async_trait]
impl WorkloadSource for KubeWorkloads {
    async fn workload_for(&self, cgroup: &CgroupPath) -> Result<Arc<Workload>, WorkloadError> {
        let uid = parse_pod_cgroup(cgroup.as_str())
            .ok_or_else(|| WorkloadError::Unknown(cgroup.clone()))?
            .pod_uid;
        let pod = self.pods.wait_for(&uid, self.settings.pod_wait).await?;
        self.workload_of(&pod)
    }

    fn refused(&self, workload: &Workload, refusal: Refusal, message: &str) {
        if let Some(pod) = &workload.pod {
            self.events.refused(pod, refusal, message);
        }
    }
}

/// The pod's names and how it runs.
fn pod_ref(pod: &Pod) -> PodRef {
    let meta = &pod.metadata;
    PodRef {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        host_network: pod
            .spec
            .as_ref()
            .and_then(|spec| spec.host_network)
            .unwrap_or(false),
        service_account: service_account_of(pod).to_owned(),
    }
}

/// The ServiceAccount the pod runs as.
fn service_account_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.as_deref())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

/// The default STS session name of a pod: `<namespace>.<pod>` within STS's 64 characters. The pod's
/// name is kept whole (its generated suffix tells replicas apart); the namespace is cut first.
fn session_name(namespace: &str, pod: &str) -> String {
    const MAX: usize = 64;
    let pod = &pod[pod.len().saturating_sub(MAX)..];
    let room = MAX.saturating_sub(pod.len() + 1);
    match namespace.get(..room.min(namespace.len())) {
        Some(cut) if !cut.is_empty() => format!("{cut}.{pod}"),
        _ => pod.to_owned(),
    }
}

/// How the reflectors list: in pages of [`LIST_PAGE_SIZE`], at the latest resourceVersion. At
/// resourceVersion 0 the API server answers from its watch cache, which ignores `limit`: every
/// ServiceAccount of the cluster in one response, however large (kube drops resourceVersion 0 from a
/// list with a limit for that reason).
fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// The annotations a pod or ServiceAccount names its role request with, each kept to its AWS limit.
fn request_annotations(settings: &KubeSettings) -> Vec<Kept> {
    vec![
        Kept::new(settings.role_key.clone(), Limit::RoleArn.max_chars()),
        Kept::new(settings.external_id_key.clone(), Limit::ExternalId.max_chars()),
        Kept::new(SESSION_NAME_KEY.into(), Limit::SessionName.max_chars()),
    ]
}

/// An annotation the rules read, and the most characters a valid value of it has. A longer value is
/// kept cut to one character more: still over the limit, so still refused as too long, and no
/// object costs the store more than that, whatever the API server let its owner write.
#[derive(Clone, Debug)]
struct Kept {
    key: Arc<str>,
    max_chars: usize,
}

impl Kept {
    fn new(key: Arc<str>, max_chars: usize) -> Self {
        Self { key, max_chars }
    }

    /// `value` cut to one character over the limit, when it is longer.
    fn cut(&self, mut value: String) -> String {
        if let Some((end, _)) = value.char_indices().nth(self.max_chars + 1) {
            value.truncate(end);
            value.shrink_to_fit();
        }
        value
    }
}

/// Labels a reflector's log lines and metrics with the resource it watches.
struct ReflectorLabels {
    resource: &'static str,
    metrics: KubeMetrics,
}

impl ReflectorLabels {
    fn new(resource: &'static str, metrics: &KubeMetrics) -> Self {
        Self {
            resource,
            metrics: metrics.clone(),
        }
    }
}

/// When a watch fails (the API server unreachable, a 410 Gone), the reflector retries after 0.25 s,
/// doubling to at most 1.5 s, each wait plus up to as much again at random, and back to 0.25 s once a
/// watch succeeds. kube-runtime's default climbs to 30 s: after a few failures a pod created meanwhile
/// stays unknown to the agent, and refused, for tens of seconds after the API server is back, long
/// after the kubelet started it. With waits of 1.5 to 3 s, 5,000 nodes make about 2,200 attempts a
/// second at an API server that is down (each a refused connection), and list their own pods within
/// 3 s of its return (docs/scale.md).
fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_millis(1500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// A reflector's store and whether it has listed once.
type Reflected<K> = (Store<K>, tokio::sync::watch::Receiver<bool>);

/// Runs a reflector for `api` until the runtime ends: `slim` strips each object before it is stored,
/// `on_event` sees each event after the store took it. Watch errors are logged and counted; the
/// watcher backs off and resumes (re-listing after 410 Gone).
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    slim: impl FnMut(&mut K) + Send + 'static,
    labels: ReflectorLabels,
    mut on_event: impl FnMut(&watcher::Event<K>, &Store<K>) + Send + 'static,
) -> Reflected<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::default();
    let store = writer.as_reader();
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let reader = store.clone();
    tokio::spawn(async move {
        let stream = watcher(api, config)
            .backoff(watch_backoff())
            .modify(slim)
            .reflect(writer);
        futures::pin_mut!(stream);
        let mut lists = 0u64;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    match &event {
                        watcher::Event::Init => {
                            lists += 1;
                            if lists > 1 {
                                labels.metrics.watch_restarted(labels.resource);
                                tracing::info!(resource = labels.resource, "re-listing");
                            }
                        }
                        watcher::Event::InitDone => {
                            tracing::info!(resource = labels.resource, objects = reader.len(), "listed");
                            synced_tx.send_replace(true);
                        }
                        _ => {}
                    }
                    on_event(&event, &reader);
                }
                Err(err) => {
                    labels.metrics.watch_failed(labels.resource);
                    tracing::warn!(resource = labels.resource, error = %crate::error_chain(&err), "watch failed; retrying");
                }
            }
        }
    });
    (store, synced)
}

/// Keeps what the rules read of a pod: its name, namespace, UID, the annotations named by `keys` (cut
/// to their limits), its node, ServiceAccount, whether it is hostNetwork, and its phase. Everything
/// else (managedFields, labels, containers, conditions) goes, so the store's memory stays flat however
/// much the pods change.
fn slim_pod(pod: &mut Pod, keys: &[Kept]) {
    slim_meta(&mut pod.metadata, keys);
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        ..Default::default()
    });
}

/// Keeps an object's name, namespace, UID, resourceVersion, deletion time and the annotations named by
/// `keys`, each cut to its limit.
fn slim_meta(meta: &mut ObjectMeta, keys: &[Kept]) {
    let annotations = meta.annotations.take().map(|all| {
        all.into_iter()
            .filter_map(|(key, value)| {
                let kept = keys.iter().find(|kept| *kept.key == *key)?;
                Some((key, kept.cut(value)))
            })
            .collect()
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        annotations,
        ..Default::default()
    };
}

#[cfg(test)]
mod tests;
