//! The fake Kubernetes API server against real clients: kubectl 1.35 (watch, tables, field selectors,
//! create, get) and kube 5's `watcher`, `reflector` and `events::Recorder` (the agent's own client),
//! including the trouble a real server makes: watches cut, history compacted, the server down, and
//! RBAC's 403 Forbidden when a test enforces a ClusterRole's rules.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use interceptor_tests::{
    kube_api::{FakeApiServer, RequestLog, TOTAL_ANNOTATION_SIZE_LIMIT},
    lab::Interactive,
    privileged, python,
    sim::SimNode,
    unique_name,
};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    rbac::v1::PolicyRule,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::ObjectList,
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use serde_json::{Value, json};

/// A node with the fake API server and a kubeconfig for it; a namespace and a node name of the
/// test's own, with pods on that node or elsewhere.
struct Cluster {
    server: FakeApiServer,
    node: SimNode,
    dir: tempfile::TempDir,
    namespace: String,
    node_name: String,
}

impl Cluster {
    /// The cluster for `test`, or `None` where it cannot run (root is needed for the node's
    /// namespace; `kubectl` says whether kubectl is needed too).
    fn for_test(test: &str, kubectl: bool) -> Result<Option<Self>> {
        if !privileged::can_run(test) || (kubectl && !python::has_kubectl(test)) {
            return Ok(None);
        }
        let node = SimNode::new()?;
        let server = FakeApiServer::start(&node)?;
        let dir = tempfile::tempdir()?;
        server.write_kubeconfig(&dir.path().join("kubeconfig"))?;
        let mut cluster = Self {
            server,
            node,
            dir,
            namespace: String::new(),
            node_name: unique_name("node-"),
        };
        cluster.namespace = cluster.namespace();
        Ok(Some(cluster))
    }

    /// `spec.nodeName=<the test's node>`.
    fn selector(&self) -> String {
        format!("spec.nodeName={}", self.node_name)
    }

    /// A pod of the test's namespace on the test's node.
    fn here(&self, name: &str) -> Pod {
        pod(&self.namespace, name, &self.node_name)
    }

    /// A pod of the test's namespace on another node.
    fn elsewhere(&self, name: &str) -> Pod {
        pod(&self.namespace, name, "another-node")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// kubectl in the node, with this cluster's kubeconfig and a discovery cache of its own.
    fn kubectl(&self, args: &[&str]) -> Result<Command> {
        let cgroup = self.node.cgroup("system.slice/kubectl")?;
        let mut command = self.node.command(&cgroup, python::kubectl()?)?;
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args);
        Ok(command)
    }

    /// Runs kubectl to the end; its standard output, or an error with its standard error.
    fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?.output().context("cannot run kubectl")?;
        ensure!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kube client for this cluster, from the kubeconfig (to be used in the node's namespace).
    async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// A new namespace.
    fn namespace(&self) -> String {
        let name = unique_name("ns-");
        self.server
            .apply_namespace(object(json!({ "metadata": { "name": name } })));
        name
    }
}

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

fn pod(namespace: &str, name: &str, node: &str) -> Pod {
    object(json!({
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "registry.example/app:1" }] },
    }))
}

fn annotated(mut pod: Pod, key: &str, value: &str) -> Pod {
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(key.to_owned(), value.to_owned());
    pod
}

/// Waits (bounded) until `condition` holds, checking every few milliseconds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn pod_requests(server: &FakeApiServer, path: &str) -> Vec<RequestLog> {
    server
        .requests()
        .into_iter()
        .filter(|request| request.path == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_watch_sees_a_create_an_update_and_a_delete() -> Result<()> {
    let Some(cluster) = Cluster::for_test("kubectl watch", true)? else {
        return Ok(());
    };
    let (server, namespace) = (&cluster.server, &cluster.namespace);
    let template = r#"{.type} {.object.metadata.name} {.object.metadata.annotations.note}{"\n"}"#;
    let watch = cluster.kubectl(&[
        "get",
        "pods",
        "--namespace",
        namespace,
        "--watch",
        "--output-watch-events",
        "--output",
        &format!("jsonpath={template}"),
    ])?;
    let mut kubectl = Interactive::spawn(watch)?;
    let pods_path = format!("/api/v1/namespaces/{namespace}/pods");
    eventually("kubectl's watch", || {
        pod_requests(server, &pods_path).iter().any(RequestLog::is_watch)
    })
    .await?;

    let created = server.apply_pod(cluster.elsewhere("web"));
    assert_eq!(kubectl.line().await?.trim_end(), "ADDED web");
    server.apply_pod(annotated(created, "note", "updated"));
    assert_eq!(kubectl.line().await?.trim_end(), "MODIFIED web updated");
    assert!(server.delete_pod(namespace, "web"));
    assert_eq!(kubectl.line().await?.trim_end(), "DELETED web updated");
    drop(kubectl); // killed

    // kubectl listed, then watched from the list's resourceVersion (not from "0", which replays).
    let requests = pod_requests(server, &pods_path);
    ensure!(requests.first().is_some_and(RequestLog::is_list), "{requests:#?}");
    let watch = requests
        .iter()
        .find(|request| request.is_watch())
        .context("a watch")?;
    let rv = watch.param("resourceVersion").unwrap_or_default();
    ensure!(!rv.is_empty() && rv != "0", "{watch:?}");
    Ok(())
}

#[test]
fn kubectl_lists_selects_creates_and_gets() -> Result<()> {
    let Some(cluster) = Cluster::for_test("kubectl get and create", true)? else {
        return Ok(());
    };
    let server = &cluster.server;
    let (first, second) = (cluster.namespace.clone(), cluster.namespace());

    // Namespaces, as a server-side table.
    let namespaces = cluster.kubectl_output(&["get", "namespaces"])?;
    let names: BTreeSet<&str> = namespaces
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for expected in [first.as_str(), second.as_str(), "default", "kube-system"] {
        ensure!(names.contains(expected), "no {expected} in:\n{namespaces}");
    }
    ensure!(namespaces.starts_with("NAME"), "{namespaces}");

    // Only this node's pods, across namespaces.
    let (node, selector) = (&cluster.node_name, cluster.selector());
    server.apply_pod(cluster.here("here-1"));
    server.apply_pod(pod(&second, "here-2", node));
    server.apply_pod(cluster.elsewhere("elsewhere"));
    let pods = cluster.kubectl_output(&["get", "pods", "--all-namespaces", "--field-selector", &selector])?;
    let rows: BTreeSet<(&str, &str)> = pods
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cells = line.split_whitespace();
            Some((cells.next()?, cells.next()?))
        })
        .collect();
    let expected = BTreeSet::from([(first.as_str(), "here-1"), (second.as_str(), "here-2")]);
    assert_eq!(rows, expected, "{pods}");
    let pod_lists = pod_requests(server, "/api/v1/pods");
    ensure!(
        pod_lists
            .iter()
            .all(|request| request.param("fieldSelector") == Some(selector.as_str())),
        "{pod_lists:#?}"
    );

    // A core/v1 Event from a manifest file (no flags: validation is left to the server).
    let manifest = cluster.dir.path().join("event.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Event\nmetadata:\n  name: here-1.kubectl\n  namespace: {first}\n\
             involvedObject:\n  apiVersion: v1\n  kind: Pod\n  name: here-1\n  namespace: {first}\n\
             reason: Tested\nmessage: created by kubectl\ntype: Normal\nsource:\n  component: kube-api-test\n"
        ),
    )?;
    let created = cluster.kubectl_output(&["create", "--filename", path_str(&manifest)?])?;
    assert_eq!(created.trim(), "event/here-1.kubectl created");
    let events = server.events();
    let event = events
        .iter()
        .find(|event| event["metadata"]["name"] == "here-1.kubectl")
        .with_context(|| format!("the event is not stored: {events:#?}"))?;
    assert_eq!(event["message"], "created by kubectl");
    assert_eq!(event["involvedObject"]["name"], "here-1");
    ensure!(event["metadata"]["uid"].is_string() && event["metadata"]["resourceVersion"].is_string());
    let listed = cluster.kubectl_output(&["get", "events", "--namespace", &first])?;
    ensure!(
        listed.contains("Tested") && listed.contains("pod/here-1"),
        "{listed}"
    );

    // Service accounts come and go.
    server.apply_service_account(object(
        json!({ "metadata": { "name": "reader", "namespace": first } }),
    ));
    let accounts = cluster.kubectl_output(&[
        "get",
        "serviceaccounts",
        "--namespace",
        &first,
        "--output",
        "name",
    ])?;
    assert_eq!(accounts.trim(), "serviceaccount/reader");
    assert!(server.delete_service_account(&first, "reader"));
    let accounts = cluster.kubectl_output(&[
        "get",
        "serviceaccounts",
        "--namespace",
        &first,
        "--output",
        "name",
    ])?;
    assert_eq!(accounts.trim(), "");

    // One pod as JSON: what was applied comes back.
    let annotations =
        json!({ "iam.amazonaws.com/role": "reader", "note": "a \"quoted\" value, with commas" });
    let mut applied = cluster.here("annotated");
    applied.metadata.annotations = Some(object(annotations.clone()));
    let stored = server.apply_pod(applied);
    let got: Value = serde_json::from_str(&cluster.kubectl_output(&[
        "get",
        "pod",
        "annotated",
        "--namespace",
        &first,
        "--output",
        "json",
    ])?)?;
    assert_eq!(got["metadata"]["annotations"], annotations);
    assert_eq!(got["metadata"]["uid"], json!(stored.metadata.uid));
    assert_eq!(
        got["metadata"]["resourceVersion"],
        json!(stored.metadata.resource_version)
    );
    assert_eq!(got["spec"]["nodeName"], json!(node));
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 path")
}

/// A reflector over every namespace's pods, driven on a task of the current runtime, with a quick
/// backoff after errors; counts the errors its watcher reported.
struct Reflected {
    store: Store<Pod>,
    errors: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Reflected {
    fn start(client: Client, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let errors = Arc::new(AtomicUsize::new(0));
        let counted = errors.clone();
        let stream =
            reflector::reflector(writer, watcher::watcher(Api::<Pod>::all(client), config)).backoff(Retry);
        let task = tokio::spawn(stream.for_each(move |event| {
            if event.is_err() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            std::future::ready(())
        }));
        Self { store, errors, task }
    }

    fn names(&self) -> BTreeSet<String> {
        self.store.state().iter().map(|pod| pod.name_any()).collect()
    }

    async fn holds(&self, names: &[&str]) -> Result<()> {
        let expected: BTreeSet<String> = names.iter().map(|&name| name.to_owned()).collect();
        eventually(&format!("the store to hold {names:?}"), || {
            self.names() == expected
        })
        .await
        .with_context(|| format!("it holds {:?}", self.names()))
    }
}

/// A retry 20 ms after every error, so a test sees recovery quickly.
struct Retry;

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(20))
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {}
}

impl Drop for Reflected {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lists(server: &FakeApiServer) -> usize {
    pod_requests(server, "/api/v1/pods")
        .iter()
        .filter(|request| request.is_list())
        .count()
}

fn watches(server: &FakeApiServer) -> Vec<RequestLog> {
    pod_requests(server, "/api/v1/pods")
        .into_iter()
        .filter(RequestLog::is_watch)
        .collect()
}

#[test]
fn kube_watcher_follows_its_nodes_pods_and_resumes_after_a_cut_without_relisting() -> Result<()> {
    in_node(
        "kube watcher and cut watches",
        &["a"],
        &["b"],
        async |cluster, client| {
            let (server, namespace, selector) = (&cluster.server, &cluster.namespace, cluster.selector());
            let pods = Reflected::start(client, watcher::Config::default().fields(&selector));
            pods.holds(&["a"]).await?;

            server.apply_pod(cluster.here("c"));
            pods.holds(&["a", "c"]).await?;
            server.apply_pod(annotated(cluster.here("a"), "note", "seen"));
            eventually("the update", || {
                pods.store
                    .state()
                    .iter()
                    .any(|pod| pod.annotations().get("note").is_some_and(|note| note == "seen"))
            })
            .await?;
            server.apply_pod(cluster.here("b")); // moves onto the node: ADDED to this watch
            pods.holds(&["a", "b", "c"]).await?;
            server.apply_pod(cluster.elsewhere("c")); // moves away: DELETED to this watch
            pods.holds(&["a", "b"]).await?;
            assert!(server.delete_pod(namespace, "a"));
            pods.holds(&["b"]).await?;

            let (lists_before, watches_before) = (lists(server), watches(server).len());
            let last_seen = server.resource_version();
            server.cut_watches();
            eventually("the watcher to reconnect", || {
                watches(server).len() > watches_before
            })
            .await?;
            let resumed = watches(server).pop().context("a watch")?;
            assert_eq!(
                resumed.param("resourceVersion"),
                Some(last_seen.to_string().as_str()),
                "{resumed:?}"
            );
            server.apply_pod(cluster.here("d"));
            pods.holds(&["b", "d"]).await?;
            assert_eq!(
                lists(server),
                lists_before,
                "the watcher re-listed after a clean cut"
            );
            assert_eq!(lists_before, 1);
            assert_eq!(pods.errors.load(Ordering::SeqCst), 0);

            let asked = pod_requests(server, "/api/v1/pods");
            ensure!(
                asked
                    .iter()
                    .all(|request| request.param("fieldSelector") == Some(selector.as_str())),
                "{asked:#?}"
            );
            ensure!(
                asked
                    .iter()
                    .all(|request| request.token.as_deref() == Some(server.token()))
            );
            Ok(())
        },
    )
}

#[test]
fn kube_watcher_relists_after_a_compaction() -> Result<()> {
    in_node(
        "kube watcher and compaction",
        &["a"],
        &[],
        async |cluster, client| {
            let server = &cluster.server;
            // Without bookmarks the watcher's resourceVersion stays at its last event's.
            let config = watcher::Config::default()
                .fields(&cluster.selector())
                .disable_bookmarks();
            let pods = Reflected::start(client, config);
            pods.holds(&["a"]).await?;
            assert_eq!(lists(server), 1);

            server.apply_pod(cluster.elsewhere("unseen"));
            server.compact();
            let watches_before = watches(server).len();
            server.cut_watches();
            eventually("a second list", || lists(server) == 2).await?;
            let expired = &watches(server)[watches_before];
            let compacted_at = server.resource_version();
            ensure!(
                expired
                    .param("resourceVersion")
                    .and_then(|rv| rv.parse::<u64>().ok())
                    .is_some_and(|rv| rv < compacted_at),
                "{expired:?}"
            );
            server.apply_pod(cluster.here("b"));
            pods.holds(&["a", "b"]).await?;
            ensure!(
                pods.errors.load(Ordering::SeqCst) >= 1,
                "the 410 reaches the watcher as an error"
            );
            Ok(())
        },
    )
}

#[test]
fn kube_watcher_recovers_from_an_outage_and_forgets_what_was_deleted_meanwhile() -> Result<()> {
    in_node(
        "kube watcher and an outage",
        &["a", "b"],
        &[],
        async |cluster, client| {
            let (server, namespace) = (&cluster.server, &cluster.namespace);
            let pods = Reflected::start(
                client.clone(),
                watcher::Config::default().fields(&cluster.selector()),
            );
            pods.holds(&["a", "b"]).await?;

            server.set_down(true);
            let refused = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await;
            ensure!(
                refused.is_err(),
                "a request during the outage succeeded: {refused:?}"
            );
            eventually("the watcher to see the outage", || {
                pods.errors.load(Ordering::SeqCst) > 0
            })
            .await?;
            // What happens while no watch is open, and is then compacted away.
            assert!(server.delete_pod(namespace, "b"));
            server.apply_pod(cluster.here("c"));
            server.compact();
            let requests_while_down = server.requests().len();
            server.set_down(false);

            pods.holds(&["a", "c"]).await?;
            assert_eq!(
                lists(server),
                2,
                "the watcher re-listed after its resourceVersion expired"
            );
            assert_eq!(
                Api::<Pod>::all(client)
                    .list(&ListParams::default())
                    .await?
                    .items
                    .len(),
                2
            );
            ensure!(server.requests().len() > requests_while_down);
            Ok(())
        },
    )
}

#[test]
fn kube_streaming_list_watcher_needs_no_list() -> Result<()> {
    in_node("kube streaming list", &["a"], &["b"], async |cluster, client| {
        let server = &cluster.server;
        let config = watcher::Config::default()
            .fields(&cluster.selector())
            .streaming_lists();
        let pods = Reflected::start(client, config);
        pods.store.wait_until_ready().await?;
        assert_eq!(pods.names(), BTreeSet::from(["a".to_owned()]));
        server.apply_pod(cluster.here("c"));
        pods.holds(&["a", "c"]).await?;

        assert_eq!(lists(server), 0);
        let first = watches(server).into_iter().next().context("a watch")?;
        assert_eq!(first.param("sendInitialEvents"), Some("true"));
        assert_eq!(first.param("resourceVersionMatch"), Some("NotOlderThan"));
        assert_eq!(first.param("allowWatchBookmarks"), Some("true"));
        Ok(())
    })
}

/// Runs `check` with a kube client inside the node, after applying pods named `here` on the test's
/// node and `elsewhere` on another; does nothing where the test cannot run.
fn in_node(
    test: &str,
    here: &[&str],
    elsewhere: &[&str],
    check: impl AsyncFnOnce(&Cluster, Client) -> Result<()> + Send,
) -> Result<()> {
    let Some(cluster) = Cluster::for_test(test, false)? else {
        return Ok(());
    };
    for &name in here {
        cluster.server.apply_pod(cluster.here(name));
    }
    for &name in elsewhere {
        cluster.server.apply_pod(cluster.elsewhere(name));
    }
    let cluster = &cluster;
    cluster
        .server
        .block_on_in_node(move || async move { check(cluster, cluster.client().await?).await })?
}

/// The pods every test of the API's details starts with, on the test's node.
const FIVE: &[&str] = &["p1", "p2", "p3", "p4", "p5"];

/// The test's namespace's pods.
fn pods_of(cluster: &Cluster, client: &Client) -> Api<Pod> {
    Api::namespaced(client.clone(), &cluster.namespace)
}

/// The code and reason of the Status an API call failed with.
fn status<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<(u16, String)> {
    match result {
        Err(kube::Error::Api(status)) => Ok((status.code, status.reason)),
        other => Err(anyhow::anyhow!("not an API error: {other:?}")),
    }
}

#[test]
fn kube_lists_page_and_select_as_the_real_server_does() -> Result<()> {
    in_node("kube list details", FIVE, &[], async |cluster, client| {
        let pods = pods_of(cluster, &client);
        // Pages of two, each continuing where the last stopped, at one resourceVersion.
        let (mut names, mut token, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let mut params = ListParams::default().limit(2);
            if let Some(token) = token.take() {
                params = params.continue_token(&token);
            }
            let page = pods.list(&params).await?;
            pages += 1;
            names.extend(page.items.iter().map(ResourceExt::name_any));
            match page.metadata.continue_ {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => break,
            }
        }
        assert_eq!((names.join(","), pages), ("p1,p2,p3,p4,p5".to_owned(), 3));
        // At resourceVersion 0 the watch cache answers, and ignores the limit: all, no continue token.
        // (kube never asks so: it drops resourceVersion 0 from a list with a limit.)
        let uri = format!(
            "/api/v1/namespaces/{}/pods?limit=2&resourceVersion=0",
            cluster.namespace
        );
        let cached: ObjectList<Pod> = client
            .request(axum::http::Request::get(uri).body(Vec::new())?)
            .await?;
        assert_eq!(cached.items.len(), 5);
        assert_eq!(cached.metadata.continue_, None);

        // Label selectors, equality- and set-based.
        let mut labelled = cluster.here("p3");
        labelled.metadata.labels = Some(object(json!({ "app": "web", "tier": "front" })));
        cluster.server.apply_pod(labelled);
        let selector = "app=web,tier in (front, back),!canary";
        let selected = pods.list(&ListParams::default().labels(selector)).await?;
        let selected: Vec<String> = selected.items.iter().map(ResourceExt::name_any).collect();
        assert_eq!(selected, ["p3"]);

        // Metadata only, as kube's metadata_watcher asks.
        assert_eq!(pods.list_metadata(&ListParams::default()).await?.items.len(), 5);

        // Errors carry the real server's Status.
        let unsupported = pods.list(&ListParams::default().fields("spec.image=x")).await;
        assert_eq!(status(unsupported)?, (400, "BadRequest".to_owned()));
        assert_eq!(status(pods.get("missing").await)?, (404, "NotFound".to_owned()));
        Ok(())
    })
}

#[test]
fn kube_watches_get_the_real_servers_events() -> Result<()> {
    in_node("kube watch details", FIVE, &[], async |cluster, client| {
        let pods = pods_of(cluster, &client);
        let server = &cluster.server;
        // A pod that leaves the selector is DELETED, with its last matching state.
        let watch_params = WatchParams::default().fields(&cluster.selector());
        let from = server.resource_version().to_string();
        let mut events = pods.watch(&watch_params, &from).await?.boxed();
        server.apply_pod(cluster.elsewhere("p1"));
        match events.try_next().await? {
            Some(WatchEvent::Deleted(gone)) => {
                assert_eq!(gone.name_any(), "p1");
                assert_eq!(
                    gone.resource_version(),
                    Some(server.resource_version().to_string())
                );
                let node = gone.spec.and_then(|spec| spec.node_name);
                assert_eq!(node.as_ref(), Some(&cluster.node_name));
            }
            other => anyhow::bail!("expected DELETED, got {other:?}"),
        }
        // Bookmarks on demand, at the current resourceVersion.
        server.bookmark();
        match events.try_next().await? {
            Some(WatchEvent::Bookmark(bookmark)) => {
                assert_eq!(
                    bookmark.metadata.resource_version,
                    server.resource_version().to_string()
                );
            }
            other => anyhow::bail!("expected BOOKMARK, got {other:?}"),
        }

        // From before a compaction: one ERROR with a 410 Expired Status, then the end.
        server.compact();
        let mut expired = pods.watch(&WatchParams::default(), &from).await?.boxed();
        match expired.try_next().await? {
            Some(WatchEvent::Error(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            }
            other => anyhow::bail!("expected a 410 ERROR, got {other:?}"),
        }
        assert!(expired.try_next().await?.is_none());

        // timeoutSeconds ends a watch cleanly.
        let started = Instant::now();
        let now = server.resource_version().to_string();
        let mut brief = pods
            .watch(&WatchParams::default().timeout(1), &now)
            .await?
            .boxed();
        assert!(brief.try_next().await?.is_none());
        let lasted = started.elapsed();
        ensure!(lasted >= Duration::from_millis(900), "ended after {lasted:?}");
        Ok(())
    })
}

#[test]
fn kube_event_recorder_posts_then_patches() -> Result<()> {
    in_node("kube event recorder", FIVE, &[], async |cluster, client| {
        let pods = pods_of(cluster, &client);
        let target = pods.get("p2").await?;
        let recorder = Recorder::new(client, Reporter::from("interceptor-test"));
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "RoleDenied".to_owned(),
            note: Some("no such role".to_owned()),
            action: "AssumeRole".to_owned(),
            secondary: None,
        };
        recorder.publish(&event, &target.object_ref(&())).await?;
        recorder.publish(&event, &target.object_ref(&())).await?;
        let recorded: Vec<Value> = cluster
            .server
            .events()
            .into_iter()
            .filter(|event| event["apiVersion"] == "events.k8s.io/v1")
            .collect();
        assert_eq!(recorded.len(), 1, "{recorded:#?}");
        assert_eq!(recorded[0]["regarding"]["name"], "p2");
        assert_eq!(recorded[0]["series"]["count"], 2);
        let events_path = format!("/apis/events.k8s.io/v1/namespaces/{}/events", cluster.namespace);
        let calls: Vec<String> = cluster
            .server
            .requests()
            .into_iter()
            .filter(|request| request.path.starts_with(&events_path))
            .map(|request| format!("{} {}", request.method, request.status))
            .collect();
        assert_eq!(calls, ["POST 201", "PATCH 200"]);
        Ok(())
    })
}

#[test]
fn bad_input_gets_a_status_and_namespaces_take_their_contents_along() -> Result<()> {
    in_node(
        "kube bad input and namespaces",
        FIVE,
        &[],
        async |cluster, client| {
            let pods = pods_of(cluster, &client);
            let namespace = &cluster.namespace;
            let reply = raw_request(&format!(
                "POST /api/v1/namespaces/{namespace}/pods HTTP/1.1\r\nHost: api\r\n\
             Content-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n\
             {{\"bad\": ,"
            ))
            .await?;
            ensure!(reply.starts_with("HTTP/1.1 400"), "{reply}");
            let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap_or_default())?;
            assert_eq!(
                (body["kind"].as_str(), body["code"].as_u64()),
                (Some("Status"), Some(400))
            );

            // Annotations of 256 KiB in all, keys and values, are taken; a byte more is refused.
            let mut annotated = cluster.here("p1");
            let key = "example.com/blob";
            let at_limit = "z".repeat(TOTAL_ANNOTATION_SIZE_LIMIT - key.len());
            annotated.metadata.annotations = Some([(key.to_owned(), at_limit.clone())].into());
            pods.replace("p1", &Default::default(), &annotated).await?;
            annotated.metadata.annotations = Some([(key.to_owned(), format!("{at_limit}z"))].into());
            let over = pods.replace("p1", &Default::default(), &annotated).await;
            assert_eq!(status(over)?, (422, "Invalid".to_owned()));

            let namespaces: Api<Namespace> = Api::all(client);
            let labels = namespaces
                .get(namespace)
                .await?
                .metadata
                .labels
                .unwrap_or_default();
            assert_eq!(labels.get("kubernetes.io/metadata.name"), Some(namespace));
            assert!(cluster.server.delete_namespace(namespace));
            assert!(pods.list(&ListParams::default()).await?.items.is_empty());
            assert_eq!(
                status(namespaces.get(namespace).await)?,
                (404, "NotFound".to_owned())
            );
            Ok(())
        },
    )
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]) -> PolicyRule {
    let owned = |items: &[&str]| items.iter().map(|item| item.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(owned(groups)),
        resources: Some(owned(resources)),
        verbs: owned(verbs),
        resource_names: (!names.is_empty()).then(|| owned(names)),
        non_resource_urls: None,
    }
}

/// The message and reason of the Status an API call failed with.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<(u16, String, String)> {
    match result {
        Err(kube::Error::Api(status)) => Ok((status.code, status.reason, status.message)),
        other => Err(anyhow::anyhow!("not an API error: {other:?}")),
    }
}

#[test]
fn with_rbac_enforced_what_no_rule_allows_is_forbidden_with_the_real_servers_status() -> Result<()> {
    in_node("kube rbac", FIVE, &[], async |cluster, client| {
        let user = "system:serviceaccount:kube-system:agent";
        cluster.server.enforce_rbac(
            user,
            vec![
                rule(&[""], &["pods"], &["list", "watch"], &[]),
                rule(&["events.k8s.io"], &["events"], &["create"], &[]),
                rule(&[""], &["nodes"], &["get"], &["node-a"]),
                // A list without a watch.
                rule(&[""], &["serviceaccounts"], &["list"], &[]),
            ],
        );
        let namespace = &cluster.namespace;
        let pods = pods_of(cluster, &client);
        assert_eq!(pods.list(&ListParams::default()).await?.items.len(), 5);
        let all_pods: Api<Pod> = Api::all(client.clone());
        let mut watched = watcher(all_pods, watcher::Config::default().fields(&cluster.selector()))
            .default_backoff()
            .applied_objects()
            .boxed();
        let first = tokio::time::timeout(Duration::from_secs(10), watched.try_next()).await??;
        assert!(first.is_some(), "list and watch are allowed");

        let forbidden = |verb: &str, resource: &str, group: &str, scope: &str| {
            format!("User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}")
        };
        let in_namespace = format!("in the namespace \"{namespace}\"");
        assert_eq!(
            refusal(pods.get("p1").await)?,
            (
                403,
                "Forbidden".to_owned(),
                format!(
                    "pods \"p1\" is forbidden: {}",
                    forbidden("get", "pods", "", &in_namespace)
                )
            )
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        assert_eq!(
            refusal(namespaces.list(&ListParams::default()).await)?.2,
            format!(
                "namespaces is forbidden: {}",
                forbidden("list", "namespaces", "", "at the cluster scope")
            )
        );
        // Resource names: only the node named.
        let nodes: Api<Node> = Api::all(client.clone());
        assert_eq!(refusal(nodes.get("node-a").await)?.1, "NotFound");
        assert_eq!(refusal(nodes.get("node-b").await)?.1, "Forbidden");
        assert_eq!(refusal(nodes.list(&ListParams::default()).await)?.1, "Forbidden");
        // A list is no watch.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        accounts.list(&ListParams::default()).await?;
        let watch = accounts.watch(&WatchParams::default(), "0").await.map(|_| ());
        assert_eq!(refusal(watch)?.1, "Forbidden");
        // An Event is created, and its series patch refused.
        let recorder = Recorder::new(client.clone(), Reporter::from("interceptor-test"));
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "RoleDenied".to_owned(),
            note: None,
            action: "AssumeRole".to_owned(),
            secondary: None,
        };
        let regarding = cluster.here("p2").object_ref(&());
        recorder.publish(&event, &regarding).await?;
        let patched = recorder.publish(&event, &regarding).await;
        assert_eq!(
            refusal(patched)?.2,
            format!(
                "events.events.k8s.io \"{}\" is forbidden: {}",
                cluster.server.events()[0]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default(),
                forbidden("patch", "events", "events.k8s.io", &in_namespace)
            )
        );
        // Discovery stays open.
        client.apiserver_version().await?;

        // The whole Status, as the real server writes it.
        let reply = raw_request(&format!(
            "GET /api/v1/namespaces/{namespace}/pods/p3 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        ))
        .await?;
        ensure!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap_or_default())?;
        assert_eq!(
            body,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("pods \"p3\" is forbidden: {}", forbidden("get", "pods", "", &in_namespace)),
                "reason": "Forbidden", "details": {"name": "p3", "kind": "pods"}, "code": 403,
            })
        );
        let refused: Vec<String> = cluster
            .server
            .requests()
            .into_iter()
            .filter(|request| request.status == 403)
            .map(|request| format!("{} {}", request.method, request.path))
            .collect();
        let event_name = cluster.server.events()[0]["metadata"]["name"].clone();
        let in_ns = format!("/api/v1/namespaces/{namespace}");
        assert_eq!(
            refused,
            [
                format!("GET {in_ns}/pods/p1"),
                "GET /api/v1/namespaces".to_owned(),
                "GET /api/v1/nodes/node-b".to_owned(),
                "GET /api/v1/nodes".to_owned(),
                format!("GET {in_ns}/serviceaccounts"),
                format!(
                    "PATCH /apis/events.k8s.io/v1/namespaces/{namespace}/events/{}",
                    event_name.as_str().unwrap_or_default()
                ),
                format!("GET {in_ns}/pods/p3"),
            ],
            "each refusal is logged with its 403"
        );

        // Everything, with wildcards.
        cluster
            .server
            .enforce_rbac(user, vec![rule(&["*"], &["*"], &["*"], &[])]);
        pods.get("p1").await?;
        namespaces.list(&ListParams::default()).await?;
        Ok(())
    })
}

/// Sends `request` as it is and reads the reply to the end (the request asks to close).
async fn raw_request(request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(FakeApiServer::addr()).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply)).await??;
    Ok(reply)
}
