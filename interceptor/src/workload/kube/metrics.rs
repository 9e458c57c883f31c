//! workload::kube::metrics: what the Kubernetes source shows an operator: pods in the store, watch
//! restarts and failures by resource, requests that waited for a pod (how they ended, how long), and
//! refusals and Events by reason.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    reason: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug)]
pub struct KubeMetrics {
    pods: Gauge,
    watch_restarts: Family<ResourceLabels, Counter>,
    watch_errors: Family<ResourceLabels, Counter>,
    pod_waits: Family<OutcomeLabels, Counter>,
    pod_wait_seconds: Histogram,
    refusals: Family<ReasonLabels, Counter>,
    events: Family<EventLabels, Counter>,
}

impl Default for KubeMetrics {
    fn default() -> Self {
        Self {
            pods: Gauge::default(),
            watch_restarts: Family::default(),
            watch_errors: Family::default(),
            pod_waits: Family::default(),
            // 1 ms to ~2 s.
            pod_wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            refusals: Family::default(),
            events: Family::default(),
        }
    }
}

impl KubeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kubernetes_pods",
            "Pods of this node in the agent's store",
            self.pods.clone(),
        );
        registry.register(
            "kubernetes_watch_restarts",
            "Re-lists after the first, by resource (after API server trouble or 410 Gone)",
            self.watch_restarts.clone(),
        );
        registry.register(
            "kubernetes_watch_errors",
            "Failed list or watch calls, by resource (the watcher backs off and retries)",
            self.watch_errors.clone(),
        );
        registry.register(
            "pod_waits",
            "Requests from a pod not yet in the store, by how the wait ended (found, deleted, timed_out)",
            self.pod_waits.clone(),
        );
        registry.register_with_unit(
            "pod_wait",
            "How long requests waited for their pod to reach the store",
            Unit::Seconds,
            self.pod_wait_seconds.clone(),
        );
        registry.register(
            "kubernetes_refusals",
            "Pods refused a role, by reason (bad_annotation, namespace_restricted, bad_session_tags, assume_role_failed)",
            self.refusals.clone(),
        );
        registry.register(
            "kubernetes_events",
            "Events posted on refused pods, by reason and result (at most one per pod and reason per interval)",
            self.events.clone(),
        );
    }

    pub(super) fn set_pods(&self, pods: usize) {
        self.pods.set(i64::try_from(pods).unwrap_or(i64::MAX));
    }

    pub(super) fn watch_restarted(&self, resource: &'static str) {
        self.watch_restarts
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    pub(super) fn watch_failed(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    pub(super) fn waited(&self, outcome: &'static str, waited: Duration) {
        self.pod_waits.get_or_create(&OutcomeLabels { outcome }).inc();
        self.pod_wait_seconds.observe(waited.as_secs_f64());
    }

    pub(super) fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(super) fn event(&self, reason: &'static str, ok: bool) {
        let result = crate::telemetry::ResultLabels::outcome(ok).result;
        self.events.get_or_create(&EventLabels { reason, result }).inc();
    }
}
