//! telemetry: what operators see of the agent. Logs (text or JSON on standard error), and the health
//! server on `--metrics-addr`, apart from the metadata API: `/metrics` (Prometheus, every module's
//! metrics under the `interceptor_` prefix), `/healthz` (the process is alive) and `/readyz` (programs
//! attached, workload source synced, the node's own credentials available).

use std::{
    collections::HashSet,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context, Result};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sends logs to standard error in the chosen format.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("bad --log-level {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|err| anyhow::anyhow!("cannot set up logging: {err}"))
}

/// The three conditions of readiness, each set by the part of the agent that meets it.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    workloads_synced: AtomicBool,
    node_credentials: AtomicBool,
}

impl Readiness {
    pub fn set_attached(&self, value: bool) {
        self.attached.store(value, Ordering::SeqCst);
    }

    pub fn set_workloads_synced(&self, value: bool) {
        self.workloads_synced.store(value, Ordering::SeqCst);
    }

    pub fn set_node_credentials(&self, value: bool) {
        self.node_credentials.store(value, Ordering::SeqCst);
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        [
            (&self.attached, "BPF programs not attached"),
            (&self.workloads_synced, "workload source not synced"),
            (&self.node_credentials, "node credentials not available"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::SeqCst))
        .map(|(_, what)| what)
        .collect()
    }
}

/// The `result` label of metrics that count attempts by how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

impl ResultLabels {
    /// `success` or `error`.
    pub fn outcome(ok: bool) -> Self {
        Self {
            result: if ok { "success" } else { "error" },
        }
    }
}

/// Role ARNs that keep series of their own in a metric labelled by role. A node's pods name a few
/// dozen roles at most; each costs about 20 series (a histogram of STS latency among them), so the
/// agent exposes at most about 2,000 of them however many roles its pods name over its life.
pub const MAX_ROLE_SERIES: usize = 100;
/// The `role` label of what roles past [`MAX_ROLE_SERIES`] are counted under (no role ARN reads so).
pub const OTHER_ROLE: &str = "other";

/// The `role` label of a metric's samples: the first [`MAX_ROLE_SERIES`] role ARNs it sees keep
/// theirs until the agent restarts; later ones share [`OTHER_ROLE`], whose series count what fell
/// over the cap. Clones share one set.
#[derive(Clone, Debug)]
pub struct RoleLabelCap {
    cap: usize,
    own: Arc<RwLock<HashSet<String>>>,
}

impl Default for RoleLabelCap {
    fn default() -> Self {
        Self::with_cap(MAX_ROLE_SERIES)
    }
}

impl RoleLabelCap {
    fn with_cap(cap: usize) -> Self {
        Self {
            cap,
            own: Arc::default(),
        }
    }

    /// The label of a sample of `role`.
    pub fn of(&self, role: &str) -> String {
        if self.own.read().unwrap_or_else(|e| e.into_inner()).contains(role) {
            return role.to_owned();
        }
        let mut own = self.own.write().unwrap_or_else(|e| e.into_inner());
        if own.contains(role) || own.len() < self.cap {
            own.insert(role.to_owned());
            return role.to_owned();
        }
        OTHER_ROLE.to_owned()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The registry every module's metrics join, and the readiness flags.
pub struct Telemetry {
    registry: RwLock<Registry>,
    pub readiness: Readiness,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The agent's version (value 1)", build_info);
        Self {
            registry: RwLock::new(registry),
            readiness: Readiness::default(),
        }
    }
}

impl Telemetry {
    /// Lets a module add its metrics (`register(&mut Registry)`) or a collector.
    pub fn register(&self, register: impl FnOnce(&mut Registry)) {
        register(&mut self.registry.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The OpenMetrics text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(telemetry)
}

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> Response {
    // A BPF map walk happens here; keep it off the async workers.
    let text = tokio::task::spawn_blocking(move || telemetry.encode()).await;
    match text {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n").into_response(),
    }
}

async fn readyz(State(telemetry): State<Arc<Telemetry>>) -> Response {
    let missing = telemetry.readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
            .into_response()
    }
}

/// Binds the health server's address and serves it in the background.
pub async fn spawn_server(addr: std::net::SocketAddr, telemetry: Arc<Telemetry>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(telemetry)).await {
            tracing::error!(error = %err, "the health server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(telemetry: &Arc<Telemetry>, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
        let response = router(telemetry.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_only_when_attached_synced_and_credentialed() {
        let telemetry = Arc::new(Telemetry::default());
        assert_eq!(get(&telemetry, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&telemetry, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not attached") && body.contains("not synced") && body.contains("credentials"));
        telemetry.readiness.set_attached(true);
        telemetry.readiness.set_workloads_synced(true);
        assert_eq!(
            get(&telemetry, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        telemetry.readiness.set_node_credentials(true);
        assert_eq!(
            get(&telemetry, "/readyz").await,
            (StatusCode::OK, "ready\n".to_owned())
        );
    }

    #[test]
    fn the_first_roles_keep_their_labels_and_later_ones_share_other() {
        let labels = RoleLabelCap::with_cap(2);
        let arn = |name: &str| format!("arn:aws:iam::123456789012:role/{name}");
        assert_eq!(labels.of(&arn("a")), arn("a"));
        assert_eq!(labels.clone().of(&arn("b")), arn("b"), "clones share the set");
        assert_eq!(labels.of(&arn("c")), OTHER_ROLE);
        assert_eq!(
            labels.of(&arn("a")),
            arn("a"),
            "a role with its own series keeps it"
        );
        assert_eq!(labels.of(&arn("d")), OTHER_ROLE);
        assert_eq!(labels.own.read().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_with_build_info() {
        let telemetry = Arc::new(Telemetry::default());
        let (status, body) = get(&telemetry, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("interceptor_build_info{version=\""), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
