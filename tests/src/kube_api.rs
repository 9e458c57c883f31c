//! A fake Kubernetes API server for the tests: pods, namespaces, service accounts, nodes and events
//! (core/v1 and events.k8s.io/v1), with the parts of the real protocol that kube's `watcher`, `reflector` and
//! `events::Recorder` and kubectl use: discovery, get, list with `limit`/`continue` pagination (a list
//! at resourceVersion 0 whole, as the watch cache serves it) and field and label selectors, watch
//! (replay from a resourceVersion, bookmarks, streaming lists with `sendInitialEvents`, 410 Gone after
//! a compaction), create, replace, merge patch, JSON patch (RFC 6902, a failed `test` answered 422 as
//! the real server does) and delete, server-side tables and `PartialObjectMetadata`. Objects whose
//! annotations are over the real server's 256 KiB are refused (422).
//!
//! It listens on the simulated node's address (`http://10.99.0.1:6443`), on a thread of its own that
//! runs inside the node's network namespace, so the agent reaches it as it would reach a real API
//! server, and nothing listens in the host's namespace. Started with [`FakeApiServer::start_in_cluster`]
//! it also serves HTTPS where a pod finds the cluster's `kubernetes` Service (`https://10.96.0.1:443`),
//! with a certificate from a cluster CA of its own, so a client with in-cluster config (the
//! ServiceAccount's token and `ca.crt`, `KUBERNETES_SERVICE_HOST`) verifies and reaches it. A test drives it directly
//! ([`FakeApiServer::apply_pod`] and the like, as a controller would), makes trouble
//! ([`FakeApiServer::cut_watches`], [`FakeApiServer::compact`], [`FakeApiServer::set_down`],
//! [`FakeApiServer::set_failing`], [`FakeApiServer::change_node_before_next_patch`]) and
//! checks what clients asked ([`FakeApiServer::requests`]) and posted ([`FakeApiServer::events`]).
//!
//! Storage is one map of JSON objects and the history of every change, under one resourceVersion
//! counter, as etcd keeps them: a list at an exact resourceVersion and a watch from an old one are
//! answered from that history until [`FakeApiServer::compact`] forgets it.
//!
//! Authorization is off unless a test turns it on: [`FakeApiServer::enforce_rbac`] checks every resource
//! request against a ClusterRole's rules and answers the rest 403 Forbidden, as RBAC does (`rbac`).
//!
//! Left out: client certificates and authentication (any request is served, with a token or without,
//! as the one user RBAC is enforced for; kubectl sends no token over plain HTTP),
//! protobuf and CBOR (JSON only), aggregated discovery (the legacy documents, which clients fall
//! back to), schema validation (OpenAPI v3 only says which operations take `fieldValidation`, so
//! kubectl leaves validation to the server), server-side apply (415), graceful
//! deletion (a delete is immediate), and conversion between the two Event groups.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State as AxumState},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, ServiceAccount},
        rbac::v1::PolicyRule,
    },
    apimachinery::pkg::apis::meta::v1::{
        APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
        ListMeta, ServerAddressByClientCIDR, Status, StatusDetails, Time,
    },
    jiff::Timestamp,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{oneshot, watch},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tower::ServiceExt as _;

use crate::{
    netns::{network_namespace_of, runtime_in},
    sim::{NODE_IP, SimNode},
};

mod rbac;

/// The port the API server listens on in the node, as a real one does.
pub const API_PORT: u16 = 6443;

/// The cluster's `kubernetes` Service, which pods reach the API server at (kube-proxy forwards its
/// ClusterIP to the server; here the server listens on it, an address of the node).
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const SERVICE_PORT: u16 = 443;

/// How often an open watch that allows bookmarks gets one, without [`FakeApiServer::bookmark`].
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);

/// The annotation on the bookmark that ends the initial events of a streaming list.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// How long a watch lasts when the client gives no `timeoutSeconds` (the real server picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One request the server received, in arrival order.
#[derive(Clone, Debug)]
pub struct RequestLog {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    /// The bearer token of the `Authorization` header, if any.
    pub token: Option<String>,
    /// The `Accept` header, if any.
    pub accept: Option<String>,
    /// The response's status code (200 for a watch, whatever its stream then carried).
    pub status: u16,
}

impl RequestLog {
    /// The value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether this is a watch (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        self.param("watch").and_then(parse_bool).unwrap_or(false)
    }

    /// What RBAC checks for this request, `(API group, resource, verb)`, as the server's authorizer
    /// reads it; `None` for a non-resource path (discovery, health).
    pub fn rbac_attributes(&self) -> Option<(String, String, String)> {
        let method = Method::from_bytes(self.method.as_bytes()).ok()?;
        rbac::group_resource_verb(&method, &parse_path(&self.path), &Params(self.query.clone()))
    }

    /// Whether this is a list (a collection GET that is no watch).
    pub fn is_list(&self) -> bool {
        self.method == "GET"
            && !self.is_watch()
            && matches!(parse_path(&self.path), Target::Collection { .. })
    }
}

/// The API server. Serves until dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// The cluster CA's certificate (PEM), when the server also serves HTTPS at the Service address.
    cluster_ca: Option<String>,
    /// How many addresses it listens on.
    endpoints: usize,
    netns: OwnedFd,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts the server on the node's address, with the namespaces every cluster has (`default`,
    /// `kube-system`, `kube-public`, `kube-node-lease`).
    pub fn start(node: &SimNode) -> Result<Self> {
        Self::start_with(node, None)
    }

    /// [`FakeApiServer::start`], and HTTPS at the `kubernetes` Service address ([`SERVICE_IP`], made an
    /// address of the node), for clients with in-cluster config ([`FakeApiServer::in_cluster_env`],
    /// [`FakeApiServer::write_service_account`]).
    pub fn start_in_cluster(node: &SimNode) -> Result<Self> {
        // kube-proxy's part: the Service's ClusterIP reaches the server.
        let cgroup = node.cgroup("system.slice/kube-proxy.service")?;
        let mut add_address = node.command(&cgroup, "ip")?;
        add_address.args(["addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"]);
        let status = add_address.status().context("cannot run ip")?;
        anyhow::ensure!(status.success(), "{add_address:?} failed: {status}");
        let (cluster_ca, acceptor) = cluster_tls()?;
        let service = Endpoint {
            addr: Self::service_addr(),
            listener: node.bind_tcp(Self::service_addr())?,
            tls: Some(acceptor),
        };
        let mut server = Self::start_with(node, Some(service))?;
        server.cluster_ca = Some(cluster_ca);
        Ok(server)
    }

    fn start_with(node: &SimNode, service: Option<Endpoint>) -> Result<Self> {
        let listener = node.bind_tcp(Self::addr())?;
        let netns = network_namespace_of(&listener)?;
        let plain = Endpoint {
            addr: Self::addr(),
            listener,
            tls: None,
        };
        let endpoints: Vec<Endpoint> = std::iter::once(plain).chain(service).collect();
        let endpoint_count = endpoints.len();
        let shared = Arc::new(Shared::new());
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            shared
                .write(NAMESPACES, named(name, None), Origin::Test)
                .map_err(|err| anyhow::anyhow!(err.message))?;
        }
        let thread_netns = netns.try_clone()?;
        let (stop, stopped) = oneshot::channel();
        let (started_tx, started) = mpsc::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kube-api".to_owned())
            .spawn(move || match runtime_in(&thread_netns) {
                Ok(runtime) => {
                    let _ = started_tx.send(Ok(()));
                    runtime.block_on(serve(serving, endpoints, stopped));
                }
                Err(err) => {
                    let _ = started_tx.send(Err(err));
                }
            })
            .context("cannot start the API server's thread")?;
        started
            .recv()
            .context("the API server's thread ended before it started")?
            .context("cannot run the API server in the node's network namespace")?;
        Ok(Self {
            shared,
            cluster_ca: None,
            endpoints: endpoint_count,
            netns,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where the server listens, in the node.
    pub fn addr() -> SocketAddr {
        SocketAddr::from((NODE_IP, API_PORT))
    }

    /// The server's URL: `http://10.99.0.1:6443`.
    pub fn url(&self) -> String {
        format!("http://{}", Self::addr())
    }

    /// Where the `kubernetes` Service is, in the node (HTTPS, after [`FakeApiServer::start_in_cluster`]).
    fn service_addr() -> SocketAddr {
        SocketAddr::from((SERVICE_IP, SERVICE_PORT))
    }

    /// The bearer token the kubeconfig and the ServiceAccount carry (any token is accepted).
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The variables the kubelet puts in every container's environment for the `kubernetes` Service
    /// (in the `default` namespace's service links, and the two `rest.InClusterConfig` reads).
    pub fn in_cluster_env() -> Vec<(String, String)> {
        let (ip, port) = (SERVICE_IP.to_string(), SERVICE_PORT.to_string());
        let url = format!("tcp://{ip}:{port}");
        [
            ("KUBERNETES_SERVICE_HOST", ip.clone()),
            ("KUBERNETES_SERVICE_PORT", port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", port.clone()),
            ("KUBERNETES_PORT", url.clone()),
            (&format!("KUBERNETES_PORT_{port}_TCP"), url),
            (&format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".to_owned()),
            (&format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
            (&format!("KUBERNETES_PORT_{port}_TCP_ADDR"), ip),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Writes what the kubelet mounts at `/var/run/secrets/kubernetes.io/serviceaccount` for a pod of
    /// `namespace`: `token` (this server's), `ca.crt` (its cluster CA) and `namespace`. Fails when the
    /// server was not started with [`FakeApiServer::start_in_cluster`].
    pub fn write_service_account(&self, dir: &Path, namespace: &str) -> Result<()> {
        let ca = self
            .cluster_ca
            .as_ref()
            .context("the API server serves no HTTPS: start it with start_in_cluster")?;
        for (name, content) in [("token", self.token()), ("ca.crt", ca), ("namespace", namespace)] {
            let path = dir.join(name);
            std::fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes a kubeconfig (JSON, which is YAML) for this server, with a bearer token, its context
    /// selected and `default` as the namespace.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url()}}],
            "users": [{"name": "fake", "user": {"token": self.token()}}],
            "contexts": [{
                "name": "fake",
                "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
            }],
            "current-context": "fake",
            "preferences": {},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// From now on, every resource request is authorized as RBAC authorizes `user` (as a 403 names it,
    /// e.g. `system:serviceaccount:kube-system:interceptor`) bound to ClusterRoles with `rules`: one no
    /// rule allows is answered 403 Forbidden with the real server's Status, and logged with that
    /// status. Discovery and other non-resource paths stay open, as the default ClusterRoles leave
    /// them to every client.
    pub fn enforce_rbac(&self, user: &str, rules: Vec<PolicyRule>) {
        *self.shared.rbac.lock().unwrap_or_else(|e| e.into_inner()) = Some(rbac::Rbac {
            user: user.to_owned(),
            rules,
        });
    }

    /// Creates or replaces a pod (by namespace, `default` when unset, and name), as a controller
    /// would: fills the uid (when missing), resourceVersion and creationTimestamp, emits ADDED or
    /// MODIFIED (nothing when nothing changed), and returns the stored pod.
    pub fn apply_pod(&self, pod: Pod) -> Pod {
        self.apply(PODS, pod)
    }

    /// Deletes a pod at once (as with a grace period of 0); emits DELETED. `false` if there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.shared.delete(&(PODS, namespace.to_owned(), name.to_owned()))
    }

    /// Creates or replaces a namespace; the server adds the `kubernetes.io/metadata.name` label, the
    /// `kubernetes` finalizer and phase `Active`, as the real one does.
    pub fn apply_namespace(&self, namespace: Namespace) -> Namespace {
        self.apply(NAMESPACES, namespace)
    }

    /// Deletes a namespace and everything in it (each with its DELETED). `false` if there was none.
    pub fn delete_namespace(&self, name: &str) -> bool {
        self.shared.delete(&(NAMESPACES, String::new(), name.to_owned()))
    }

    /// Creates or replaces a service account.
    pub fn apply_service_account(&self, account: ServiceAccount) -> ServiceAccount {
        self.apply(SERVICE_ACCOUNTS, account)
    }

    /// Deletes a service account. `false` if there was none.
    pub fn delete_service_account(&self, namespace: &str, name: &str) -> bool {
        self.shared
            .delete(&(SERVICE_ACCOUNTS, namespace.to_owned(), name.to_owned()))
    }

    /// Creates or replaces a Node (cluster-scoped, by name), as the kubelet registers one.
    pub fn apply_node(&self, node: Node) -> Node {
        self.apply(NODES, node)
    }

    /// The Node `name` as stored now, if there is one.
    pub fn node(&self, name: &str) -> Option<Node> {
        let object = self
            .shared
            .state()
            .objects
            .get(&(NODES, String::new(), name.to_owned()))
            .cloned();
        object.map(|object| serde_json::from_value(object).expect("a stored Node is a Node"))
    }

    /// A race another client wins: the next PATCH of Node `node`'s name first finds `node` stored, as
    /// if someone wrote it between the patching client's read and its write.
    pub fn change_node_before_next_patch(&self, node: Node) {
        let object = serde_json::to_value(node).expect("k8s-openapi objects serialize");
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        *self.shared.patch_race.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(((NODES, String::new(), name), object));
    }

    /// Trouble with one resource: while `failing`, every request whose path is `path` (without the
    /// query, e.g. `/api/v1/pods`) is answered 503 ServiceUnavailable, and the rest are served.
    pub fn set_failing(&self, path: &str, failing: bool) {
        let mut paths = self.shared.failing.lock().unwrap_or_else(|e| e.into_inner());
        paths.retain(|failing_path| failing_path != path);
        if failing {
            paths.push(path.to_owned());
        }
    }

    /// Every Event clients created, core/v1 and events.k8s.io/v1 alike, in the order they were
    /// created, each as it is stored now (as posted, with the metadata the server filled, and the
    /// patches since applied). The two groups are stored apart: the server converts neither into the
    /// other.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state().event_log.clone()
    }

    /// An outage: `true` ends every open connection at once (a watch stream breaks off mid-body) and
    /// closes the listening sockets, so every new connection is refused, as when the API server's
    /// process is gone; clients see "connection refused" (kubectl: "The connection to the server ...
    /// was refused"). `false` listens again. Returns once the listener is closed or open again.
    pub fn set_down(&self, down: bool) {
        self.shared.outage.send_modify(|outage| {
            if down && !outage.down {
                outage.generation += 1;
            }
            outage.down = down;
        });
        let listening = self.shared.listening.0.lock().unwrap_or_else(|e| e.into_inner());
        let endpoints = self.endpoints;
        let _ = self
            .shared
            .listening
            .1
            .wait_timeout_while(listening, Duration::from_secs(10), |open| {
                if down { *open > 0 } else { *open < endpoints }
            });
    }

    /// Ends every open watch now, cleanly (the chunked body ends): clients reconnect from the last
    /// resourceVersion they saw.
    pub fn cut_watches(&self) {
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Forgets the history up to now, as an etcd compaction does: from now on a watch from an older
    /// resourceVersion gets a single ERROR event with a 410 `Expired` Status, and so does a list at an
    /// exact older resourceVersion (or a continue token from before). A list with
    /// `resourceVersionMatch=NotOlderThan` is served from the current state, as the real server does.
    pub fn compact(&self) {
        let mut state = self.shared.state();
        state.compacted = state.rv;
    }

    /// Sends a BOOKMARK now on every open watch that allows them (they also get one every
    /// [`BOOKMARK_INTERVAL`]).
    pub fn bookmark(&self) {
        self.shared.bookmarks.send_modify(|bookmarks| *bookmarks += 1);
    }

    /// The server's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs the future `make` makes to completion on a thread of its own inside the node's network
    /// namespace, with a runtime of its own, so a client it builds (a kube `Client`) reaches the server
    /// as the agent does. The future is made on that thread, so it need not be `Send`.
    pub fn block_on_in_node<F, Fut>(&self, make: F) -> Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Fut::Output> {
                    let runtime = runtime_in(&self.netns).context("cannot enter the node")?;
                    Ok(runtime.block_on(make()))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in the node panicked"))?
        })
    }

    fn apply<K: Serialize + DeserializeOwned>(&self, kind: usize, object: K) -> K {
        let object = serde_json::to_value(object).expect("k8s-openapi objects serialize");
        let stored = self
            .shared
            .write(kind, object, Origin::Test)
            .unwrap_or_else(|err| panic!("cannot apply a {}: {}", KINDS[kind].kind, err.message));
        serde_json::from_value(stored).expect("the stored object is the one applied, filled")
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A metadata-only object (`{"metadata": {"name": .., "namespace": ..}}`).
fn named(name: &str, namespace: Option<&str>) -> Value {
    let mut metadata = json!({ "name": name });
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    json!({ "metadata": metadata })
}

// ----- the resources ---------------------------------------------------------------------------

/// A resource the server serves.
struct Kind {
    group: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    /// Field labels a field selector may use (the real server's per-resource sets).
    fields: &'static [&'static str],
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            "v1".to_owned()
        } else {
            format!("{}/v1", self.group)
        }
    }
}

const PODS: usize = 0;
const NAMESPACES: usize = 1;
const SERVICE_ACCOUNTS: usize = 2;
const CORE_EVENTS: usize = 3;
const EVENTS: usize = 4;
const NODES: usize = 5;
const EVENTS_GROUP: &str = "events.k8s.io";

const KINDS: [Kind; 6] = [
    Kind {
        group: "",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        fields: &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Kind {
        group: "",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        fields: &["metadata.name", "status.phase"],
    },
    Kind {
        group: "",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        fields: &["metadata.name", "metadata.namespace"],
    },
    Kind {
        group: "",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        fields: &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
    },
    Kind {
        group: EVENTS_GROUP,
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        fields: &[
            "metadata.name",
            "metadata.namespace",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
    },
    Kind {
        group: "",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        fields: &["metadata.name", "spec.unschedulable"],
    },
];

/// Where an object is stored: its kind, its namespace ("" when cluster-scoped) and its name; the
/// order is etcd's key order within a kind.
type Key = (usize, String, String);

fn kind_of(group: &str, plural: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|kind| kind.group == group && kind.plural == plural)
}

// ----- errors ----------------------------------------------------------------------------------

/// A failure answered with a `Status` body, as the real server words it.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Box<StatusDetails>>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    fn about(mut self, kind: usize, name: &str) -> Self {
        self.details = Some(Box::new(StatusDetails {
            name: Some(name.to_owned()),
            group: Some(KINDS[kind].group.to_owned()).filter(|group| !group.is_empty()),
            kind: Some(KINDS[kind].plural.to_owned()),
            ..Default::default()
        }));
        self
    }

    fn not_found(kind: usize, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(kind)),
        )
        .about(kind, name)
    }

    fn conflict(kind: usize, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please \
                 apply your changes to the latest version and try again",
                qualified(kind)
            ),
        )
        .about(kind, name)
    }

    fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code)),
            details: self.details.as_deref().cloned(),
            message: Some(self.message.clone()),
            reason: Some(self.reason.to_owned()),
            status: Some("Failure".to_owned()),
            metadata: ListMeta::default(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

/// `pods`, or `events.events.k8s.io`: how the real server names a resource in its messages.
fn qualified(kind: usize) -> String {
    let kind = &KINDS[kind];
    if kind.group.is_empty() {
        kind.plural.to_owned()
    } else {
        format!("{}.{}", kind.plural, kind.group)
    }
}

// ----- selectors -------------------------------------------------------------------------------

/// One term of a field selector: `label=value`, `label==value` or `label!=value`.
#[derive(Debug)]
struct FieldTerm {
    label: String,
    equal: bool,
    value: String,
}

/// One term of a label selector.
#[derive(Debug)]
enum LabelTerm {
    Equal(String, String),
    NotEqual(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// What a list or watch asks for: one kind, maybe one namespace, and its selectors.
#[derive(Debug)]
struct Filter {
    kind: usize,
    namespace: Option<String>,
    fields: Vec<FieldTerm>,
    labels: Vec<LabelTerm>,
}

impl Filter {
    fn new(kind: usize, namespace: Option<String>, params: &Params) -> Result<Self, ApiError> {
        let fields = match params.get("fieldSelector") {
            Some(selector) => parse_field_selector(kind, selector)?,
            None => Vec::new(),
        };
        let labels = match params.get("labelSelector") {
            Some(selector) => parse_label_selector(selector)?,
            None => Vec::new(),
        };
        Ok(Self {
            kind,
            namespace,
            fields,
            labels,
        })
    }

    /// Whether `key` is in this filter's kind and namespace.
    fn covers(&self, key: &Key) -> bool {
        key.0 == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|namespace| *namespace == key.1)
    }

    fn matches(&self, object: &Value) -> bool {
        let fields = self
            .fields
            .iter()
            .all(|term| (field_value(object, &term.label) == term.value) == term.equal);
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        fields
            && self.labels.iter().all(|term| match term {
                LabelTerm::Equal(key, value) => label(key) == Some(value),
                LabelTerm::NotEqual(key, value) => label(key) != Some(value),
                LabelTerm::In(key, values) => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
                LabelTerm::NotIn(key, values) => !label(key).is_some_and(|v| values.iter().any(|x| x == v)),
                LabelTerm::Exists(key) => label(key).is_some(),
                LabelTerm::NotExists(key) => label(key).is_none(),
            })
    }
}

/// A field's value as a field selector compares it: strings as they are, booleans and numbers as
/// text, anything missing as "" (`spec.hostNetwork` as "false").
fn field_value(object: &Value, label: &str) -> String {
    let path = if label == "source" {
        "source.component"
    } else {
        label
    };
    let value = path.split('.').fold(object, |value, part| &value[part]);
    match value {
        Value::String(text) => text.clone(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::Null if label == "spec.hostNetwork" => "false".to_owned(),
        _ => String::new(),
    }
}

/// Splits `text` at the commas outside parentheses and backslash escapes.
fn split_terms(text: &str) -> Vec<String> {
    let (mut terms, mut current, mut depth, mut escaped) = (Vec::new(), String::new(), 0usize, false);
    for c in text.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
                continue;
            }
            '\\' => escaped = true,
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    terms.push(current);
    terms.into_iter().filter(|term| !term.trim().is_empty()).collect()
}

/// Removes a field selector's backslash escapes (`\,`, `\=`, `\\`).
fn unescape(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next().unwrap_or(c) } else { c });
    }
    out
}

fn parse_field_selector(kind: usize, selector: &str) -> Result<Vec<FieldTerm>, ApiError> {
    split_terms(selector)
        .iter()
        .map(|term| {
            let (label, equal, value) = ["!=", "==", "="]
                .iter()
                .find_map(|op| {
                    unescaped_find(term, op).map(|at| (&term[..at], *op != "!=", &term[at + op.len()..]))
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid selector: '{selector}'; can't understand '{term}'"
                    ))
                })?;
            let label = label.trim();
            if !KINDS[kind].fields.contains(&label) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {label}"
                )));
            }
            Ok(FieldTerm {
                label: label.to_owned(),
                equal,
                value: unescape(value.trim()),
            })
        })
        .collect()
}

/// Where `op` first stands in `term` unescaped.
fn unescaped_find(term: &str, op: &str) -> Option<usize> {
    let mut escaped = false;
    for (at, c) in term.char_indices() {
        if !escaped && term[at..].starts_with(op) {
            return Some(at);
        }
        escaped = !escaped && c == '\\';
    }
    None
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelTerm>, ApiError> {
    let invalid = |term: &str| ApiError::bad_request(format!("unable to parse requirement: found '{term}'"));
    split_terms(selector)
        .iter()
        .map(|term| {
            let term = term.trim();
            if let Some(key) = term.strip_prefix('!') {
                return Ok(LabelTerm::NotExists(key.trim().to_owned()));
            }
            let key_end = term
                .find(|c: char| c.is_whitespace() || c == '=' || c == '!')
                .unwrap_or(term.len());
            let (key, rest) = (term[..key_end].to_owned(), term[key_end..].trim_start());
            if key.is_empty() {
                return Err(invalid(term));
            }
            let set = |rest: &str| -> Result<Vec<String>, ApiError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|rest| rest.strip_suffix(')'))
                    .ok_or_else(|| invalid(term))?;
                Ok(inner.split(',').map(|value| value.trim().to_owned()).collect())
            };
            Ok(if rest.is_empty() {
                LabelTerm::Exists(key)
            } else if let Some(value) = rest.strip_prefix("!=") {
                LabelTerm::NotEqual(key, value.trim().to_owned())
            } else if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
                LabelTerm::Equal(key, value.trim().to_owned())
            } else if let Some(values) = rest.strip_prefix("notin") {
                LabelTerm::NotIn(key, set(values)?)
            } else if let Some(values) = rest.strip_prefix("in") {
                LabelTerm::In(key, set(values)?)
            } else {
                return Err(invalid(term));
            })
        })
        .collect()
}

// ----- storage ---------------------------------------------------------------------------------

/// One change, as the watch cache keeps it: the object after (none for a delete) and before.
struct Change {
    rv: u64,
    key: Key,
    object: Option<Value>,
    prev: Option<Value>,
}

/// Who writes: a test keeps the uid, creationTimestamp and status it gives; a client gets the real
/// server's treatment (a new uid and creationTimestamp on create, a pod's status reset to Pending).
#[derive(Clone, Copy, PartialEq)]
enum Origin {
    Test,
    Client,
}

/// How a write treats an existing object.
#[derive(Clone, Copy, PartialEq)]
enum WriteMode {
    /// Create or replace (the tests' apply).
    Apply,
    /// POST: fails when it exists.
    Create,
    /// PUT: fails when it does not.
    Replace,
}

#[derive(Default)]
struct StoreState {
    rv: u64,
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    event_log: Vec<Value>,
    event_index: BTreeMap<Key, usize>,
}

impl StoreState {
    /// The objects as they were at `rv`.
    fn snapshot(&self, rv: u64) -> BTreeMap<Key, Value> {
        if rv >= self.rv {
            return self.objects.clone();
        }
        let mut objects = BTreeMap::new();
        for change in self.history.iter().take_while(|change| change.rv <= rv) {
            match &change.object {
                Some(object) => objects.insert(change.key.clone(), object.clone()),
                None => objects.remove(&change.key),
            };
        }
        objects
    }

    /// The index of the first change after `rv`.
    fn position_after(&self, rv: u64) -> usize {
        self.history.partition_point(|change| change.rv <= rv)
    }

    fn record(&mut self, key: Key, object: Option<Value>, prev: Option<Value>) {
        if matches!(key.0, CORE_EVENTS | EVENTS)
            && let Some(object) = &object
        {
            match self.event_index.get(&key) {
                Some(&at) => self.event_log[at] = object.clone(),
                None => {
                    self.event_index.insert(key.clone(), self.event_log.len());
                    self.event_log.push(object.clone());
                }
            }
        }
        match &object {
            Some(object) => self.objects.insert(key.clone(), object.clone()),
            None => self.objects.remove(&key),
        };
        self.history.push(Change {
            rv: self.rv,
            key,
            object,
            prev,
        });
    }
}

/// Whether the server is down, and how many outages there have been (each ends every connection).
#[derive(Clone, Copy, Default)]
struct Outage {
    down: bool,
    generation: u64,
}

/// What the server's thread and the test's share.
struct Shared {
    store: Mutex<StoreState>,
    token: String,
    /// The current resourceVersion, sent after every change.
    changes: watch::Sender<u64>,
    cuts: watch::Sender<u64>,
    bookmarks: watch::Sender<u64>,
    outage: watch::Sender<Outage>,
    /// How many listening sockets are open.
    listening: (Mutex<usize>, Condvar),
    requests: Mutex<Vec<RequestLog>>,
    /// The object [`FakeApiServer::change_node_before_next_patch`] stores before the next PATCH of it.
    patch_race: Mutex<Option<(Key, Value)>>,
    /// Paths answered 503 ([`FakeApiServer::set_failing`]).
    failing: Mutex<Vec<String>>,
    /// The authorizer, if any ([`FakeApiServer::enforce_rbac`]).
    rbac: Mutex<Option<rbac::Rbac>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            store: Mutex::default(),
            token: format!("fake-token-{}", random_hex(8)),
            changes: watch::Sender::new(0),
            cuts: watch::Sender::new(0),
            bookmarks: watch::Sender::new(0),
            outage: watch::Sender::new(Outage::default()),
            listening: (Mutex::new(0), Condvar::new()),
            requests: Mutex::default(),
            patch_race: Mutex::default(),
            failing: Mutex::default(),
            rbac: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, StoreState> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self, rv: u64) {
        self.changes.send_replace(rv);
    }

    /// Stores `object` of `kind` and returns it as stored.
    fn write(&self, kind: usize, object: Value, origin: Origin) -> Result<Value, ApiError> {
        self.write_as(kind, object, origin, WriteMode::Apply, None)
    }

    /// Stores `object` of `kind`: `namespace` is the request's (its object's must agree).
    fn write_as(
        &self,
        kind: usize,
        mut object: Value,
        origin: Origin,
        mode: WriteMode,
        namespace: Option<&str>,
    ) -> Result<Value, ApiError> {
        let info = &KINDS[kind];
        check_shape(&object)?;
        check_annotations_size(&object)?;
        let Some(fields) = object.as_object_mut() else {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        };
        for (field, expected) in [("apiVersion", info.api_version()), ("kind", info.kind.to_owned())] {
            match fields.get(field) {
                Some(Value::String(given)) if *given != expected => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} in the data ({given}) does not match the expected {field} ({expected})"
                    )));
                }
                _ => {
                    fields.insert(field.to_owned(), json!(expected));
                }
            }
        }
        if !fields.get("metadata").is_some_and(Value::is_object) {
            fields.insert("metadata".to_owned(), json!({}));
        }
        let metadata = object["metadata"].as_object_mut().expect("metadata is an object");
        let object_namespace = metadata
            .get("namespace")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let key_namespace = if info.namespaced {
            let namespace = match (namespace, object_namespace) {
                (Some(request), Some(given)) if request != given => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the \
                         request",
                    ));
                }
                (Some(request), _) => request.to_owned(),
                (None, Some(given)) if !given.is_empty() => given,
                (None, _) => "default".to_owned(),
            };
            metadata.insert("namespace".to_owned(), json!(namespace));
            namespace
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let name = match metadata.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) if mode != WriteMode::Replace => {
                    let name = format!("{prefix}{}", &random_hex(3)[..5]);
                    metadata.insert("name".to_owned(), json!(name));
                    name
                }
                _ => {
                    return Err(ApiError::invalid(
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        let key = (kind, key_namespace, name.clone());

        let mut state = self.state();
        if origin == Origin::Client
            && info.namespaced
            && !state
                .objects
                .contains_key(&(NAMESPACES, String::new(), key.1.clone()))
        {
            return Err(ApiError::not_found(NAMESPACES, &key.1));
        }
        let prev = state.objects.get(&key).cloned();
        match (&prev, mode) {
            (Some(_), WriteMode::Create) => {
                return Err(ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", qualified(kind)),
                )
                .about(kind, &name));
            }
            (None, WriteMode::Replace) => return Err(ApiError::not_found(kind, &name)),
            _ => {}
        }
        let metadata = object["metadata"].as_object_mut().expect("metadata is an object");
        if let Some(prev) = &prev {
            let prev_metadata = &prev["metadata"];
            let given_rv = metadata
                .get("resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !given_rv.is_empty() && given_rv != prev_metadata["resourceVersion"] {
                return Err(ApiError::conflict(kind, &name));
            }
            let given_uid = metadata.get("uid").and_then(Value::as_str).unwrap_or("");
            if !given_uid.is_empty() && given_uid != prev_metadata["uid"] {
                return Err(ApiError::conflict(kind, &name));
            }
            for field in ["uid", "creationTimestamp", "resourceVersion"] {
                metadata.insert(field.to_owned(), prev_metadata[field].clone());
            }
        } else {
            if origin == Origin::Client || !metadata.get("uid").is_some_and(Value::is_string) {
                metadata.insert("uid".to_owned(), json!(random_uid()));
            }
            if origin == Origin::Client || !metadata.get("creationTimestamp").is_some_and(Value::is_string) {
                metadata.insert(
                    "creationTimestamp".to_owned(),
                    serde_json::to_value(Time(Timestamp::now())).unwrap_or_default(),
                );
            }
            if origin == Origin::Client && kind == PODS {
                object["status"] = json!({ "phase": "Pending" });
            }
        }
        default_fields(kind, &name, &mut object);
        if prev.as_ref() == Some(&object) {
            return Ok(object); // nothing changed: no new resourceVersion, no event
        }
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(key, Some(object.clone()), prev);
        drop(state);
        self.notify(rv);
        Ok(object)
    }

    /// Stores the object a test set to win the race against the next PATCH of `key`, if any.
    fn run_patch_race(&self, key: &Key) -> Result<(), ApiError> {
        let mut race = self.patch_race.lock().unwrap_or_else(|e| e.into_inner());
        match race.take() {
            Some((raced, object)) if raced == *key => self.write(key.0, object, Origin::Test).map(drop),
            other => {
                *race = other;
                Ok(())
            }
        }
    }

    /// Deletes `key` (and, for a namespace, what is in it), with a DELETED for each.
    fn delete(&self, key: &Key) -> bool {
        self.remove(key).is_some()
    }

    /// Deletes `key`, returning the object as deleted (with the deletion's resourceVersion).
    fn remove(&self, key: &Key) -> Option<Value> {
        let mut state = self.state();
        state.objects.get(key)?;
        let mut doomed: Vec<Key> = Vec::new();
        if key.0 == NAMESPACES {
            doomed.extend(
                state
                    .objects
                    .keys()
                    .filter(|inner| KINDS[inner.0].namespaced && inner.1 == key.2)
                    .cloned(),
            );
        }
        doomed.push(key.clone());
        let mut deleted = None;
        for doomed in doomed {
            let prev = state.objects.get(&doomed).cloned();
            state.rv += 1;
            let mut gone = prev.clone().unwrap_or_default();
            gone["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            state.record(doomed, None, prev);
            deleted = Some(gone);
        }
        let rv = state.rv;
        drop(state);
        self.notify(rv);
        deleted
    }
}

/// The defaults the real server fills.
fn default_fields(kind: usize, name: &str, object: &mut Value) {
    match kind {
        NAMESPACES => {
            let metadata = &mut object["metadata"];
            if !metadata["labels"].is_object() {
                metadata["labels"] = json!({});
            }
            metadata["labels"]["kubernetes.io/metadata.name"] = json!(name);
            if object["spec"]["finalizers"].is_null() {
                object["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            if object["status"]["phase"].is_null() {
                object["status"]["phase"] = json!("Active");
            }
        }
        PODS if object["status"]["phase"].is_null() => object["status"]["phase"] = json!("Pending"),
        _ => {}
    }
}

fn random_hex(bytes: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..bytes.div_ceil(8))
        .map(|_| {
            format!(
                "{:016x}",
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            )
        })
        .collect::<String>()[..bytes * 2]
        .to_owned()
}

/// A random version-4 UUID, as the real server gives every new object.
fn random_uid() -> String {
    let hex = random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

// ----- serving ---------------------------------------------------------------------------------

/// A listening socket: the node's address over HTTP, or the Service's over HTTPS.
struct Endpoint {
    addr: SocketAddr,
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
}

/// A cluster CA of the server's own, and the server's certificate from it for the Service's address,
/// the node's and the Service's DNS names, as a real API server's serving certificate carries them:
/// the CA's PEM (a ServiceAccount's `ca.crt`) and what accepts TLS connections with that certificate.
fn cluster_tls() -> Result<(String, TlsAcceptor)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kubernetes");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let names = [
        SERVICE_IP.to_string(),
        NODE_IP.to_string(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ];
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &ca)?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .context("the server's certificate and key do not go together")?;
    Ok((ca.pem(), TlsAcceptor::from(Arc::new(config))))
}

/// Accepts connections on every endpoint until `stopped`; the runtime's end closes every connection
/// still open.
async fn serve(shared: Arc<Shared>, endpoints: Vec<Endpoint>, stopped: oneshot::Receiver<()>) {
    let router = Router::new().fallback(handle).with_state(shared.clone());
    let serving = futures::future::join_all(
        endpoints
            .into_iter()
            .map(|endpoint| serve_endpoint(shared.clone(), router.clone(), endpoint)),
    );
    tokio::select! {
        _ = serving => {}
        _ = stopped => {}
    }
}

/// Accepts connections on one endpoint, closing its listener while the server is down.
async fn serve_endpoint(shared: Arc<Shared>, router: Router, endpoint: Endpoint) {
    let mut outage = shared.outage.subscribe();
    let mut listener = Some(endpoint.listener);
    loop {
        let generation = match outage.wait_for(|outage| !outage.down).await {
            Ok(outage) => outage.generation,
            Err(_) => return,
        };
        let bound = match listener.take() {
            Some(listener) => Ok(listener),
            None => std::net::TcpListener::bind(endpoint.addr),
        };
        let accepting = match bound.and_then(|listener| {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        }) {
            Ok(accepting) => accepting,
            Err(err) => {
                eprintln!("kube api: cannot listen on {}: {err}", endpoint.addr);
                return;
            }
        };
        set_listening(&shared, true);
        loop {
            tokio::select! {
                accepted = accepting.accept() => match accepted {
                    Ok((stream, _)) => {
                        let outage = shared.outage.subscribe();
                        let (router, tls) = (router.clone(), endpoint.tls.clone());
                        tokio::spawn(async move {
                            match tls {
                                None => connection(stream, router, outage, generation).await,
                                Some(tls) => match tls.accept(stream).await {
                                    Ok(stream) => connection(stream, router, outage, generation).await,
                                    Err(err) => eprintln!("kube api: TLS handshake: {err}"),
                                },
                            }
                        });
                    }
                    Err(err) => eprintln!("kube api: accept: {err}"),
                },
                _ = outage.wait_for(|outage| outage.down) => break,
            }
        }
        drop(accepting);
        set_listening(&shared, false);
    }
}

/// Counts a listening socket opened (`true`) or closed.
fn set_listening(shared: &Shared, opened: bool) {
    let mut open = shared.listening.0.lock().unwrap_or_else(|e| e.into_inner());
    if opened {
        *open += 1;
    } else {
        *open -= 1;
    }
    shared.listening.1.notify_all();
}

/// Serves one connection (HTTP/1.1, keep-alive) until it closes or an outage ends it.
async fn connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    router: Router,
    mut outage: watch::Receiver<Outage>,
    generation: u64,
) {
    let service = hyper::service::service_fn(move |request| router.clone().oneshot(request));
    let serving = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::select! {
        _ = serving => {}
        _ = outage.wait_for(|outage| outage.generation != generation) => {}
    }
}

/// The query parameters, decoded; the last of repeated ones wins.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(false),
            Some(value) => parse_bool(value).ok_or_else(|| {
                ApiError::bad_request(format!("{name}: invalid value '{value}': not a boolean"))
            }),
        }
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(value) => value
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("{name}: invalid value '{value}': not a number"))),
        }
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// What a path names.
#[derive(Debug, PartialEq)]
enum Target {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group,
    Resources(&'static str),
    OpenApiRoot,
    OpenApi(&'static str),
    Collection {
        kind: usize,
        namespace: Option<String>,
    },
    Object {
        kind: usize,
        namespace: Option<String>,
        name: String,
    },
    Unknown,
}

fn parse_path(path: &str) -> Target {
    let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
    let (group, rest) = match parts.as_slice() {
        ["version"] => return Target::Version,
        ["healthz" | "livez" | "readyz"] => return Target::Health,
        ["api"] => return Target::CoreVersions,
        ["apis"] => return Target::Groups,
        ["apis", EVENTS_GROUP] => return Target::Group,
        ["api", "v1"] => return Target::Resources(""),
        ["apis", EVENTS_GROUP, "v1"] => return Target::Resources(EVENTS_GROUP),
        ["openapi", "v3"] => return Target::OpenApiRoot,
        ["openapi", "v3", "api", "v1"] => return Target::OpenApi(""),
        ["openapi", "v3", "apis", EVENTS_GROUP, "v1"] => return Target::OpenApi(EVENTS_GROUP),
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", EVENTS_GROUP, "v1", rest @ ..] => (EVENTS_GROUP, rest),
        _ => return Target::Unknown,
    };
    let cluster_scoped = |plural: &str| kind_of(group, plural).filter(|&kind| !KINDS[kind].namespaced);
    match rest {
        [plural] => match kind_of(group, plural) {
            Some(kind) => Target::Collection {
                kind,
                namespace: None,
            },
            None => Target::Unknown,
        },
        ["namespaces", namespace, plural] => {
            match kind_of(group, plural).filter(|&kind| KINDS[kind].namespaced) {
                Some(kind) => Target::Collection {
                    kind,
                    namespace: Some((*namespace).to_owned()),
                },
                None => Target::Unknown,
            }
        }
        ["namespaces", namespace, plural, name] => {
            match kind_of(group, plural).filter(|&kind| KINDS[kind].namespaced) {
                Some(kind) => Target::Object {
                    kind,
                    namespace: Some((*namespace).to_owned()),
                    name: (*name).to_owned(),
                },
                None => Target::Unknown,
            }
        }
        [plural, name] => match cluster_scoped(plural) {
            Some(kind) => Target::Object {
                kind,
                namespace: None,
                name: (*name).to_owned(),
            },
            None => Target::Unknown,
        },
        _ => Target::Unknown,
    }
}

/// Every request: routed, then logged with its bearer token, if any.
async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|query| query.0)
        .unwrap_or_default();
    let header_text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let token = header_text(header::AUTHORIZATION)
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let target = parse_path(uri.path());
    // Any request is served, with a token or without one: over plain HTTP kubectl sends none
    // (clientcmd adds a kubeconfig's credentials only to TLS transports), as to the old insecure port.
    let params = Params(query.clone());
    // Authorized before it is handled, as the real server's filters do.
    let refused = match &*shared.rbac.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(rbac) => rbac.authorize(&method, &target, &params).err(),
        None => None,
    };
    let failing = shared
        .failing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|path| path == uri.path());
    let response = if let Some(refused) = refused {
        refused.into_response()
    } else if failing {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
        .into_response()
    } else {
        route(&shared, &method, target, &params, &headers, &body).unwrap_or_else(IntoResponse::into_response)
    };
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(RequestLog {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query,
            token,
            accept: header_text(header::ACCEPT).map(str::to_owned),
            status: response.status().as_u16(),
        });
    response
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    target: Target,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let not_allowed = || {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method}) on the requested resource"),
        )
    };
    match (target, method.clone()) {
        (Target::Version, Method::GET) => Ok(json_response(StatusCode::OK, &version())),
        (Target::Health, Method::GET) => Ok("ok".into_response()),
        (Target::CoreVersions, Method::GET) => Ok(json_response(StatusCode::OK, &core_versions())),
        (Target::Groups, Method::GET) => Ok(json_response(StatusCode::OK, &groups())),
        (Target::Group, Method::GET) => Ok(json_response(StatusCode::OK, &events_group())),
        (Target::Resources(group), Method::GET) => Ok(json_response(StatusCode::OK, &resources(group))),
        (Target::OpenApiRoot, Method::GET) => Ok(json_response(StatusCode::OK, &openapi_root())),
        (Target::OpenApi(group), Method::GET) => Ok(json_response(StatusCode::OK, &openapi(group))),
        (Target::Collection { kind, namespace }, Method::GET) => {
            let shape = Shape::negotiate(headers, params)?;
            let filter = Filter::new(kind, namespace, params)?;
            if params.flag("watch")? {
                start_watch(shared, filter, params, shape)
            } else {
                let list = list(&shared.state(), &filter, params)?;
                Ok(shape.list_response(kind, list))
            }
        }
        (
            Target::Collection {
                kind,
                namespace: None,
            },
            Method::POST,
        ) if KINDS[kind].namespaced => Err(not_allowed()),
        (Target::Collection { kind, namespace }, Method::POST) => {
            let object = parse_body(body)?;
            let stored = shared.write_as(
                kind,
                object,
                Origin::Client,
                WriteMode::Create,
                namespace.as_deref(),
            )?;
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (
            Target::Object {
                kind,
                namespace,
                name,
            },
            method,
        ) => {
            let key = (kind, namespace.clone().unwrap_or_default(), name.clone());
            match method {
                Method::GET => {
                    let shape = Shape::negotiate(headers, params)?;
                    let object = shared.state().objects.get(&key).cloned();
                    let object = object.ok_or_else(|| ApiError::not_found(kind, &name))?;
                    Ok(shape.object_response(kind, object))
                }
                Method::PUT | Method::PATCH => {
                    let object = if method == Method::PUT {
                        replacement(body, &name)?
                    } else {
                        shared.run_patch_race(&key)?;
                        let current = shared.state().objects.get(&key).cloned();
                        patched(
                            current.ok_or_else(|| ApiError::not_found(kind, &name))?,
                            headers,
                            body,
                        )?
                    };
                    let stored = shared.write_as(
                        kind,
                        object,
                        Origin::Client,
                        WriteMode::Replace,
                        namespace.as_deref(),
                    )?;
                    Ok(json_response(StatusCode::OK, &stored))
                }
                Method::DELETE => {
                    let deleted = shared
                        .remove(&key)
                        .ok_or_else(|| ApiError::not_found(kind, &name))?;
                    Ok(json_response(StatusCode::OK, &deleted))
                }
                _ => Err(not_allowed()),
            }
        }
        (Target::Unknown, _) => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
        _ => Err(not_allowed()),
    }
}

/// A PUT's object, named as the URL names it.
fn replacement(body: &Bytes, name: &str) -> Result<Value, ApiError> {
    let mut object = parse_body(body)?;
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|given| given != name)
    {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    if object["metadata"].is_null() {
        object["metadata"] = json!({});
    }
    object["metadata"]["name"] = json!(name); // an object: check_shape
    Ok(object)
}

/// `current` with a PATCH applied: a JSON patch, or a JSON merge patch (a strategic merge patch is
/// taken as one, which it is for the fields of the kinds served here but lists).
fn patched(mut current: Value, headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/json-patch+json" {
        json_patch_applied(&mut current, body)?;
        return Ok(current);
    }
    if !matches!(
        media,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json (got \
                 {content_type:?})"
            ),
        ));
    }
    merge_patch(&mut current, &parse_body(body)?);
    Ok(current)
}

/// Applies an RFC 6902 patch to `target`, all of it or (on any failed operation, a `test` whose value
/// differs too) none of it, which the real server answers 422.
fn json_patch_applied(target: &mut Value, body: &Bytes) -> Result<(), ApiError> {
    let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as a JSON patch: {err}"
        ))
    })?;
    json_patch::patch(target, &patch).map_err(|err| {
        ApiError::invalid(format!(
            "the server rejected our request due to an error in our request: {err}"
        ))
    })?;
    check_shape(target)
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(format!("the body of the request could not be decoded: {err}"))
    })?;
    check_shape(&value)?;
    Ok(value)
}

/// An object whose `metadata`, `spec` and `status` are objects (or absent) and whose labels and
/// annotations are maps of strings, as for every kind served here; the real server would not decode
/// anything else either.
fn check_shape(object: &Value) -> Result<(), ApiError> {
    let Some(fields) = object.as_object() else {
        return Err(ApiError::bad_request(
            "the body of the request is not a JSON object",
        ));
    };
    for field in ["metadata", "spec", "status"] {
        if fields
            .get(field)
            .is_some_and(|value| !value.is_object() && !value.is_null())
        {
            return Err(ApiError::bad_request(format!(
                "unable to decode the object: {field} is not an object"
            )));
        }
    }
    for field in ["labels", "annotations"] {
        let strings = match &object["metadata"][field] {
            Value::Null => true,
            Value::Object(map) => map.values().all(Value::is_string),
            _ => false,
        };
        if !strings {
            return Err(ApiError::bad_request(format!(
                "unable to decode the object: metadata.{field} is not a map of strings"
            )));
        }
    }
    Ok(())
}

/// The real server's `TotalAnnotationSizeLimitB`: an object's annotations, keys and values, hold at
/// most 256 KiB.
pub const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;

/// Refuses (422) an object whose annotations are over [`TOTAL_ANNOTATION_SIZE_LIMIT`], as the real
/// server's validation does.
fn check_annotations_size(object: &Value) -> Result<(), ApiError> {
    let size: usize = object["metadata"]["annotations"]
        .as_object()
        .map(|all| {
            all.iter()
                .map(|(key, value)| key.len() + value.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    if size > TOTAL_ANNOTATION_SIZE_LIMIT {
        return Err(ApiError::invalid(format!(
            "metadata.annotations: Too long: must have at most {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"
        )));
    }
    Ok(())
}

/// RFC 7386: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn json_response(code: StatusCode, body: &impl Serialize) -> Response {
    json_response_as(code, body, "application/json")
}

fn json_response_as(code: StatusCode, body: &impl Serialize, content_type: &str) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [(header::CONTENT_TYPE, content_type.to_owned())], bytes).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

// ----- discovery -------------------------------------------------------------------------------

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "35",
        "emulationMajor": "1",
        "emulationMinor": "35",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "34",
        "gitVersion": "v1.35.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-12-17T00:00:00Z",
        "goVersion": "go1.25.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn server_addresses() -> Option<Vec<ServerAddressByClientCIDR>> {
    Some(vec![ServerAddressByClientCIDR {
        client_cidr: "0.0.0.0/0".to_owned(),
        server_address: FakeApiServer::addr().to_string(),
    }])
}

fn core_versions() -> APIVersions {
    APIVersions {
        server_address_by_client_cidrs: server_addresses().unwrap_or_default(),
        versions: vec!["v1".to_owned()],
    }
}

fn events_group() -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: format!("{EVENTS_GROUP}/v1"),
        version: "v1".to_owned(),
    };
    APIGroup {
        name: EVENTS_GROUP.to_owned(),
        preferred_version: Some(version.clone()),
        server_address_by_client_cidrs: server_addresses(),
        versions: vec![version],
    }
}

fn groups() -> APIGroupList {
    APIGroupList {
        groups: vec![events_group()],
    }
}

fn resources(group: &str) -> APIResourceList {
    let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
    APIResourceList {
        group_version: KINDS
            .iter()
            .find(|kind| kind.group == group)
            .map(Kind::api_version)
            .unwrap_or_default(),
        resources: KINDS
            .iter()
            .filter(|kind| kind.group == group)
            .map(|kind| APIResource {
                categories: (!matches!(kind.plural, "events" | "namespaces" | "nodes"))
                    .then(|| vec!["all".to_owned()]),
                kind: kind.kind.to_owned(),
                name: kind.plural.to_owned(),
                namespaced: kind.namespaced,
                short_names: Some(kind.short_names.iter().map(|&name| name.to_owned()).collect()),
                singular_name: kind.singular.to_owned(),
                verbs: verbs.iter().map(|&verb| verb.to_owned()).collect(),
                ..Default::default()
            })
            .collect(),
    }
}

/// The OpenAPI v3 index: one document per group-version.
fn openapi_root() -> Value {
    json!({
        "paths": {
            "api/v1": { "serverRelativeURL": "/openapi/v3/api/v1?hash=1" },
            format!("apis/{EVENTS_GROUP}/v1"): {
                "serverRelativeURL": format!("/openapi/v3/apis/{EVENTS_GROUP}/v1?hash=1"),
            },
        }
    })
}

/// A group-version's OpenAPI v3 document, reduced to what kubectl reads from it: which operations
/// take `fieldValidation`. With it, `kubectl create` leaves validation to the server (which checks
/// the kind, names and versions, not the schema) instead of validating against the full schemas;
/// without it kubectl wants the full OpenAPI v2 document or `--validate=false`.
fn openapi(group: &str) -> Value {
    let mut paths = Map::new();
    for kind in KINDS.iter().filter(|kind| kind.group == group) {
        let prefix = if group.is_empty() {
            "/api/v1".to_owned()
        } else {
            format!("/apis/{group}/v1")
        };
        let collection = if kind.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural)
        } else {
            format!("{prefix}/{}", kind.plural)
        };
        let operation = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", kind.kind),
                "parameters": [{ "name": "fieldValidation", "in": "query", "schema": { "type": "string" } }],
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": { "group": group, "version": "v1", "kind": kind.kind },
            })
        };
        paths.insert(collection.clone(), json!({ "post": operation("post") }));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({ "put": operation("put"), "patch": operation("patch") }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": "v1.35.0" },
        "paths": paths,
    })
}

// ----- list ------------------------------------------------------------------------------------

/// A list's result, before it is shaped: the matching objects of one page, at one resourceVersion.
struct Page {
    items: Vec<Value>,
    rv: u64,
    continue_token: Option<String>,
    remaining: Option<usize>,
}

fn list(state: &StoreState, filter: &Filter, params: &Params) -> Result<Page, ApiError> {
    let rv_param = params.get("resourceVersion").unwrap_or("");
    // At resourceVersion 0 the real server answers from its watch cache, which ignores `limit`: the
    // whole list in one response, with no continue token (kube-apiserver's cacher sends only other
    // lists with a limit on to etcd, which pages them).
    let limit = params
        .number("limit")?
        .filter(|&limit| limit > 0 && rv_param != "0");
    let version_match = params.get("resourceVersionMatch").unwrap_or("");
    let (rv, after) = match params.get("continue").filter(|token| !token.is_empty()) {
        Some(token) => {
            if !rv_param.is_empty() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rv, after) = decode_continue(token)?;
            if rv < state.compacted {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You \
                     can start a new list without the continue parameter, or use the continue token in \
                     this response to retrieve the remainder of the results. Continuing with the provided \
                     token results in an inconsistent list - objects that were created, modified, or \
                     deleted between the time the first chunk was returned and now may show up in the \
                     list.",
                ));
            }
            (rv, Some(after))
        }
        None => (
            list_version(state, rv_param, version_match, limit.is_some())?,
            None,
        ),
    };
    let objects = state.snapshot(rv);
    let mut matching = objects
        .iter()
        .filter(|(key, _)| filter.covers(key))
        .filter(|(key, _)| {
            after
                .as_ref()
                .is_none_or(|after| (&key.1, &key.2) > (&after.0, &after.1))
        })
        .filter(|(_, object)| filter.matches(object));
    let items: Vec<(&Key, &Value)> = match limit {
        Some(limit) => matching
            .by_ref()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect(),
        None => matching.by_ref().collect(),
    };
    let remaining = matching.count();
    let continue_token = match items.last() {
        Some((key, _)) if remaining > 0 => Some(encode_continue(rv, &key.1, &key.2)),
        _ => None,
    };
    let selected = !filter.fields.is_empty() || !filter.labels.is_empty();
    Ok(Page {
        items: items.into_iter().map(|(_, object)| object.clone()).collect(),
        rv,
        continue_token,
        remaining: (remaining > 0 && !selected).then_some(remaining),
    })
}

/// The resourceVersion a list is served at, by the real server's rules.
fn list_version(state: &StoreState, rv: &str, version_match: &str, paged: bool) -> Result<u64, ApiError> {
    if rv.is_empty() {
        if !version_match.is_empty() {
            return Err(ApiError::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion \
                 is provided",
            ));
        }
        return Ok(state.rv);
    }
    let asked: u64 = rv.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "resourceVersion: Invalid value: \"{rv}\": must be a number"
        ))
    })?;
    let exact = match version_match {
        "Exact" => {
            if asked == 0 {
                return Err(ApiError::invalid(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for \
                     resourceVersion \"0\"",
                ));
            }
            true
        }
        "NotOlderThan" => false,
        "" => asked != 0 && paged,
        other => {
            return Err(ApiError::invalid(format!(
                "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \
                 \"NotOlderThan\", \"\""
            )));
        }
    };
    if asked > state.rv {
        return Err(ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {asked}, current: {}", state.rv),
        ));
    }
    if !exact {
        return Ok(state.rv);
    }
    if asked < state.compacted {
        return Err(ApiError::gone(
            "The resourceVersion for the provided list is too old.",
        ));
    }
    Ok(asked)
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    let token = json!({ "v": "meta.k8s.io/v1", "rv": rv, "start": format!("{namespace}/{name}\u{0}") });
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let invalid = || ApiError::bad_request("continue key is not valid: invalid continue token");
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| invalid())?;
    let token: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let rv = token["rv"].as_u64().ok_or_else(invalid)?;
    let start = token["start"]
        .as_str()
        .and_then(|start| start.strip_suffix('\u{0}'))
        .ok_or_else(invalid)?;
    let (namespace, name) = start.split_once('/').ok_or_else(invalid)?;
    Ok((rv, (namespace.to_owned(), name.to_owned())))
}

// ----- shapes: full objects, metadata only, tables ---------------------------------------------

/// What the client's `Accept` asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Full,
    Metadata,
    Table(IncludeObject),
}

/// A table row's `object`: `includeObject=None|Metadata|Object`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum IncludeObject {
    None,
    Metadata,
    Object,
}

const TABLE_MEDIA: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

impl Shape {
    /// The first media type in `Accept` the server can produce (JSON only, as with
    /// `--kube-api-content-type` left alone); 406 when there is none.
    fn negotiate(headers: &HeaderMap, params: &Params) -> Result<Self, ApiError> {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/json");
        for media in accept.split(',') {
            let mut parts = media.split(';').map(str::trim);
            let essence = parts.next().unwrap_or("");
            let media_params: BTreeMap<&str, &str> = parts.filter_map(|part| part.split_once('=')).collect();
            if !matches!(essence, "application/json" | "*/*" | "application/*") {
                continue;
            }
            match (media_params.get("as").copied(), media_params.get("g").copied()) {
                (None, _) => return Ok(Self::Full),
                (Some("Table"), Some("meta.k8s.io")) => {
                    let include = match params.get("includeObject") {
                        Some("None") => IncludeObject::None,
                        Some("Object") => IncludeObject::Object,
                        _ => IncludeObject::Metadata,
                    };
                    return Ok(Self::Table(include));
                }
                (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io")) => {
                    return Ok(Self::Metadata);
                }
                _ => continue,
            }
        }
        Err(ApiError::new(
            406,
            "NotAcceptable",
            format!("only the following media types are accepted: application/json, {TABLE_MEDIA}"),
        ))
    }

    fn object(self, kind: usize, object: Value) -> Value {
        match self {
            Self::Full => object,
            Self::Metadata => partial(&object),
            Self::Table(include) => table(kind, &[object], include, true, None),
        }
    }

    fn object_response(self, kind: usize, object: Value) -> Response {
        let media = if matches!(self, Self::Table(_)) {
            TABLE_MEDIA
        } else {
            "application/json"
        };
        json_response_as(StatusCode::OK, &self.object(kind, object), media)
    }

    fn list_response(self, kind: usize, page: Page) -> Response {
        let mut metadata = json!({ "resourceVersion": page.rv.to_string() });
        if let Some(token) = page.continue_token {
            metadata["continue"] = json!(token);
        }
        if let Some(remaining) = page.remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
        let info = &KINDS[kind];
        let (body, media) = match self {
            Self::Full => {
                // As the real server sends them: the items of a list carry no apiVersion and kind.
                let items: Vec<Value> = page
                    .items
                    .into_iter()
                    .map(|mut item| {
                        if let Some(fields) = item.as_object_mut() {
                            fields.remove("apiVersion");
                            fields.remove("kind");
                        }
                        item
                    })
                    .collect();
                let body = json!({
                    "kind": format!("{}List", info.kind),
                    "apiVersion": info.api_version(),
                    "metadata": metadata,
                    "items": items,
                });
                (body, "application/json")
            }
            Self::Metadata => {
                let body = json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": metadata,
                    "items": page.items.iter().map(partial).collect::<Vec<_>>(),
                });
                (body, "application/json")
            }
            Self::Table(include) => (
                table(kind, &page.items, include, true, Some(metadata)),
                TABLE_MEDIA,
            ),
        };
        json_response_as(StatusCode::OK, &body, media)
    }
}

fn partial(object: &Value) -> Value {
    json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"] })
}

/// A `meta.k8s.io/v1` Table of `objects`, with the columns the real server prints for their kind.
fn table(
    kind: usize,
    objects: &[Value],
    include: IncludeObject,
    headers: bool,
    metadata: Option<Value>,
) -> Value {
    let column = |name: &str, kind: &str, format: &str, priority: u32| {
        json!({
            "name": name, "type": kind, "format": format, "description": name, "priority": priority,
        })
    };
    let name_column = column("Name", "string", "name", 0);
    let age_column = column("Age", "string", "", 0);
    let columns = match kind {
        PODS => vec![
            name_column,
            column("Ready", "string", "", 0),
            column("Status", "string", "", 0),
            column("Restarts", "string", "", 0),
            age_column,
            column("IP", "string", "", 1),
            column("Node", "string", "", 1),
        ],
        NAMESPACES => vec![name_column, column("Status", "string", "", 0), age_column],
        SERVICE_ACCOUNTS => vec![name_column, column("Secrets", "integer", "", 0), age_column],
        NODES => vec![name_column, age_column],
        _ => vec![
            column("Last Seen", "string", "", 0),
            column("Type", "string", "", 0),
            column("Reason", "string", "", 0),
            column("Object", "string", "", 0),
            column("Message", "string", "", 0),
        ],
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let text = |pointer: &str| {
                object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let or_none = |text: String| {
                if text.is_empty() {
                    "<none>".to_owned()
                } else {
                    text
                }
            };
            let age = age_of(&text("/metadata/creationTimestamp"));
            let name = text("/metadata/name");
            let cells = match kind {
                PODS => {
                    let statuses = object["status"]["containerStatuses"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let containers = object["spec"]["containers"].as_array().map_or(0, Vec::len);
                    let ready = statuses
                        .iter()
                        .filter(|status| status["ready"] == json!(true))
                        .count();
                    let restarts: u64 = statuses
                        .iter()
                        .filter_map(|status| status["restartCount"].as_u64())
                        .sum();
                    let status = if object["metadata"]["deletionTimestamp"].is_string() {
                        "Terminating".to_owned()
                    } else {
                        text("/status/phase")
                    };
                    json!([
                        name,
                        format!("{ready}/{containers}"),
                        status,
                        restarts.to_string(),
                        age,
                        or_none(text("/status/podIP")),
                        or_none(text("/spec/nodeName"))
                    ])
                }
                NAMESPACES => json!([name, text("/status/phase"), age]),
                SERVICE_ACCOUNTS => json!([name, object["secrets"].as_array().map_or(0, Vec::len), age]),
                NODES => json!([name, age]),
                _ => {
                    let regarding = if kind == EVENTS {
                        "regarding"
                    } else {
                        "involvedObject"
                    };
                    let message = if kind == EVENTS { "/note" } else { "/message" };
                    let involved = format!(
                        "{}/{}",
                        text(&format!("/{regarding}/kind")).to_lowercase(),
                        text(&format!("/{regarding}/name"))
                    );
                    let seen = [
                        "/series/lastObservedTime",
                        "/lastTimestamp",
                        "/eventTime",
                        "/metadata/creationTimestamp",
                    ]
                    .iter()
                    .map(|pointer| text(pointer))
                    .find(|seen| !seen.is_empty())
                    .unwrap_or_default();
                    json!([
                        age_of(&seen),
                        text("/type"),
                        text("/reason"),
                        involved,
                        text(message)
                    ])
                }
            };
            let row_object = match include {
                IncludeObject::None => Value::Null,
                IncludeObject::Metadata => partial(object),
                IncludeObject::Object => object.clone(),
            };
            json!({ "cells": cells, "object": row_object })
        })
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata.unwrap_or_else(|| json!({})),
        "rows": rows,
    });
    if headers {
        table["columnDefinitions"] = json!(columns);
    }
    table
}

/// How long ago `timestamp` was, as kubectl prints ages (`5s`, `3m2s`, `4h`, `2d`).
fn age_of(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<Timestamp>() else {
        return "<unknown>".to_owned();
    };
    let seconds = Timestamp::now()
        .as_second()
        .saturating_sub(then.as_second())
        .max(0);
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    match () {
        () if seconds < 120 => format!("{seconds}s"),
        () if minutes < 10 && seconds % 60 != 0 => format!("{minutes}m{}s", seconds % 60),
        () if minutes < 180 => format!("{minutes}m"),
        () if hours < 8 && minutes % 60 != 0 => format!("{hours}h{}m", minutes % 60),
        () if hours < 48 => format!("{hours}h"),
        () => format!("{}d", hours / 24),
    }
}

// ----- watch -----------------------------------------------------------------------------------

/// What wakes a watch: a change, a cut, a bookmark asked for.
struct Signals {
    changes: watch::Receiver<u64>,
    cuts: watch::Receiver<u64>,
    bookmarks: watch::Receiver<u64>,
}

/// What one watch sends before its live events, and from where it goes on.
struct WatchPlan {
    filter: Filter,
    shape: Shape,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    /// Lines to send first: the initial events, or the 410 ERROR (and then nothing more).
    first: Vec<Bytes>,
    /// The history index live events start from; `None` after an ERROR.
    position: Option<usize>,
    /// The resourceVersion the client is known to be up to (for bookmarks).
    seen: u64,
    /// Whether the next event is the first with a table's headers.
    headers: bool,
}

fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &Params,
    shape: Shape,
) -> Result<Response, ApiError> {
    // Subscribed before anything else: a cut or bookmark asked for once this watch is being served
    // reaches it, even before its task runs.
    let signals = Signals {
        changes: shared.changes.subscribe(),
        cuts: shared.cuts.subscribe(),
        bookmarks: shared.bookmarks.subscribe(),
    };
    let bookmarks = params.flag("allowWatchBookmarks")?;
    let send_initial = match params.get("sendInitialEvents") {
        None | Some("") => None,
        Some(_) => Some(params.flag("sendInitialEvents")?),
    };
    let version_match = params.get("resourceVersionMatch").unwrap_or("");
    match send_initial {
        Some(_) if version_match != "NotOlderThan" => {
            return Err(ApiError::invalid(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch \
                 to NotOlderThan",
            ));
        }
        Some(true) if !bookmarks => {
            return Err(ApiError::invalid(
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to \
                 true",
            ));
        }
        None if !version_match.is_empty() => {
            return Err(ApiError::invalid(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless \
                 sendInitialEvents is provided",
            ));
        }
        _ => {}
    }
    let timeout = match params.number("timeoutSeconds")? {
        None | Some(0) => DEFAULT_WATCH_TIMEOUT,
        Some(seconds) => Duration::from_secs(seconds),
    };
    let rv_param = params.get("resourceVersion").unwrap_or("");
    let asked: u64 = match rv_param {
        "" => 0,
        rv => rv.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: \"{rv}\": must be a number"
            ))
        })?,
    };
    let state = shared.state();
    let mut plan = WatchPlan {
        filter,
        shape,
        bookmarks,
        deadline: tokio::time::Instant::now() + timeout,
        first: Vec::new(),
        position: Some(state.history.len()),
        seen: state.rv,
        headers: true,
    };
    // rv unset or "0" starts at now with the current objects as ADDED; so does sendInitialEvents=true
    // (from any rv: NotOlderThan); otherwise the history after rv is replayed.
    let initial = send_initial.unwrap_or(asked == 0);
    if initial {
        let objects: Vec<Value> = state
            .objects
            .iter()
            .filter(|(key, object)| plan.filter.covers(key) && plan.filter.matches(object))
            .map(|(_, object)| object.clone())
            .collect();
        for object in objects {
            let line = plan.event_line("ADDED", object);
            plan.first.push(line);
        }
        if send_initial == Some(true) {
            let line = plan.bookmark_line(state.rv, true);
            plan.first.push(line);
        }
    } else if asked < state.compacted {
        let status =
            ApiError::gone(format!("too old resource version: {asked} ({})", state.compacted)).status();
        plan.first.push(watch_line(
            "ERROR",
            serde_json::to_value(status).unwrap_or_default(),
        ));
        plan.position = None;
    } else {
        plan.position = Some(state.position_after(asked));
        plan.seen = asked;
    }
    drop(state);

    let (lines, receiver) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(run_watch(shared.clone(), plan, signals, lines));
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|line| (Ok::<_, Infallible>(line), receiver))
    });
    let media = if matches!(shape, Shape::Table(_)) {
        TABLE_MEDIA
    } else {
        "application/json"
    };
    Ok(([(header::CONTENT_TYPE, media)], Body::from_stream(stream)).into_response())
}

fn watch_line(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

impl WatchPlan {
    fn event_line(&mut self, kind: &str, object: Value) -> Bytes {
        let object = match self.shape {
            Shape::Table(include) => {
                let table = table(self.filter.kind, &[object], include, self.headers, None);
                self.headers = false;
                table
            }
            shape => shape.object(self.filter.kind, object),
        };
        watch_line(kind, object)
    }

    fn bookmark_line(&self, rv: u64, initial_end: bool) -> Bytes {
        let info = &KINDS[self.filter.kind];
        let (api_version, kind) = match self.shape {
            Shape::Metadata => ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadata"),
            _ => (info.api_version(), info.kind),
        };
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_end {
            metadata["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
        }
        watch_line(
            "BOOKMARK",
            json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata }),
        )
    }

    /// The event `change` makes for this watch, as the watch cache decides it: ADDED when the object
    /// starts to match, MODIFIED while it matches, DELETED when it is deleted or stops matching (with
    /// its last matching content and the change's resourceVersion).
    fn event_for(&mut self, change: &Change) -> Option<Bytes> {
        if !self.filter.covers(&change.key) {
            return None;
        }
        let now = change
            .object
            .as_ref()
            .filter(|object| self.filter.matches(object));
        let before = change.prev.as_ref().filter(|prev| self.filter.matches(prev));
        match (now, before) {
            (Some(object), None) => Some(self.event_line("ADDED", object.clone())),
            (Some(object), Some(_)) => Some(self.event_line("MODIFIED", object.clone())),
            (None, Some(prev)) => {
                let mut gone = prev.clone();
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(self.event_line("DELETED", gone))
            }
            (None, None) => None,
        }
    }
}

/// Sends a watch's lines until its timeout, a cut, an outage or the client's leaving.
async fn run_watch(
    shared: Arc<Shared>,
    mut plan: WatchPlan,
    signals: Signals,
    lines: tokio::sync::mpsc::Sender<Bytes>,
) {
    let Signals {
        mut changes,
        mut cuts,
        mut bookmarks,
    } = signals;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    for line in std::mem::take(&mut plan.first) {
        if lines.send(line).await.is_err() {
            return;
        }
    }
    let Some(mut position) = plan.position else {
        return; // the ERROR ends the watch
    };
    let mut bookmark_due = false;
    loop {
        let mut pending = Vec::new();
        {
            let state = shared.state();
            for change in &state.history[position..] {
                pending.extend(plan.event_for(change));
            }
            position = state.history.len();
            plan.seen = state.rv;
        }
        if bookmark_due && plan.bookmarks {
            pending.push(plan.bookmark_line(plan.seen, false));
        }
        bookmark_due = false;
        for line in pending {
            if lines.send(line).await.is_err() {
                return;
            }
        }
        tokio::select! {
            biased;
            _ = cuts.changed() => return,
            () = tokio::time::sleep_until(plan.deadline) => return,
            () = lines.closed() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = bookmarks.changed() => bookmark_due = true,
            _ = ticker.tick() => bookmark_due = true,
        }
    }
}
