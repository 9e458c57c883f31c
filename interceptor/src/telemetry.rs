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
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, family::Family, gauge::ConstGauge, gauge::Gauge},
    registry::{Registry, Unit},
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

/// The three conditions of readiness, each set by the part of the agent that meets it, and shown as
/// the `readiness{check}` gauge (1 met, 0 not) for alerts: `/readyz` tells the kubelet, this tells
/// Prometheus.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    workloads_synced: AtomicBool,
    node_credentials: AtomicBool,
    checks: Family<CheckLabels, Gauge>,
}

/// The `check` label of the readiness gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
}

/// Each check: its label, and what `/readyz` says while it is not met.
const CHECKS: [(&str, &str); 3] = [
    ("bpf_attached", "BPF programs not attached"),
    ("workloads_synced", "workload source not synced"),
    ("node_credentials", "node credentials not available"),
];

impl Readiness {
    pub fn set_attached(&self, value: bool) {
        self.set(0, &self.attached, value);
    }

    pub fn set_workloads_synced(&self, value: bool) {
        self.set(1, &self.workloads_synced, value);
    }

    pub fn set_node_credentials(&self, value: bool) {
        self.set(2, &self.node_credentials, value);
    }

    fn set(&self, check: usize, flag: &AtomicBool, value: bool) {
        flag.store(value, Ordering::SeqCst);
        self.checks
            .get_or_create(&CheckLabels {
                check: CHECKS[check].0,
            })
            .set(i64::from(value));
    }

    fn flags(&self) -> [&AtomicBool; 3] {
        [&self.attached, &self.workloads_synced, &self.node_credentials]
    }

    /// What is still missing; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        self.flags()
            .into_iter()
            .zip(CHECKS)
            .filter(|(flag, _)| !flag.load(Ordering::SeqCst))
            .map(|(_, (_, what))| what)
            .collect()
    }

    /// Registers the gauge, every check at 0 until it is met.
    fn register(&self, registry: &mut Registry) {
        for (check, _) in CHECKS {
            self.checks.get_or_create(&CheckLabels { check }).set(0);
        }
        registry.register(
            "readiness",
            "Readiness checks of /readyz by check (bpf_attached, workloads_synced, node_credentials): 1 met, 0 not",
            self.checks.clone(),
        );
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
        let readiness = Readiness::default();
        readiness.register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            registry: RwLock::new(registry),
            readiness,
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

/// The agent's resident memory at each scrape (`process_resident_memory_bytes`, as other exporters name
/// it), read from `/proc/self/status`: what the dashboard's memory panel shows beside the requests.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(bytes) = resident_bytes() else {
            return Ok(());
        };
        let metric = encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory of the agent's process",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        ConstGauge::new(bytes).encode(metric)
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
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
        let (_, metrics) = get(&telemetry, "/metrics").await;
        for check in ["bpf_attached", "workloads_synced", "node_credentials"] {
            let sample = format!("interceptor_readiness{{check=\"{check}\"}} 1");
            assert!(metrics.lines().any(|line| line == sample), "{sample}: {metrics}");
        }
        telemetry.readiness.set_workloads_synced(false);
        let (_, metrics) = get(&telemetry, "/metrics").await;
        assert!(
            metrics.contains("interceptor_readiness{check=\"workloads_synced\"} 0"),
            "{metrics}"
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
        let resident = body
            .lines()
            .find_map(|line| line.strip_prefix("interceptor_process_resident_memory_bytes "))
            .and_then(|value| value.parse::<i64>().ok());
        assert!(resident.is_some_and(|bytes| bytes > 1 << 20), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
