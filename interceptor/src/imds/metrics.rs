//! imds::metrics: what the metadata API did: requests by route and status, their latency, refusals by
//! reason, credentials served by role, connections by whether the kernel attributed them,
//! connections closed at accept by the limit they were over, requests over their caller's rate
//! by whether they were held or refused, and answers that carried the node's own credentials by grant. Label values are fixed strings, status codes and role ARNs
//! (bounded by the workload source's policy).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    grant: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    attributed: &'static str,
}

/// 100 us to about 3.3 s: a cached answer takes well under a millisecond, an STS call tens to hundreds.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

#[derive(Clone, Debug)]
pub struct ImdsMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    refusals: Family<ReasonLabels, Counter>,
    credentials_served: Family<RoleLabels, Counter>,
    connections: Family<ConnectionLabels, Counter>,
    connections_refused: Family<ReasonLabels, Counter>,
    over_rate: Family<OutcomeLabels, Counter>,
    node_credentials_served: Family<GrantLabels, Counter>,
}

impl Default for ImdsMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            refusals: Family::default(),
            credentials_served: Family::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            over_rate: Family::default(),
            node_credentials_served: Family::default(),
        }
    }
}

impl ImdsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "metadata_requests",
            "Metadata API requests by route and status",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "metadata_request_duration",
            "Time to answer a metadata API request, by route",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "metadata_refusals",
            "Metadata API requests refused, by reason",
            self.refusals.clone(),
        );
        registry.register(
            "credentials_served",
            "Credential documents served, by role ARN",
            self.credentials_served.clone(),
        );
        registry.register(
            "metadata_connections",
            "Connections accepted by the metadata API, by whether the kernel attributed them",
            self.connections.clone(),
        );
        registry.register(
            "metadata_connections_refused",
            "Connections closed at accept because too many were open, by which limit",
            self.connections_refused.clone(),
        );
        registry.register(
            "metadata_requests_over_rate",
            "Requests over their caller's rate limit, by outcome: held for a later slot, or refused (429)",
            self.over_rate.clone(),
        );
        registry.register(
            "node_credentials_served",
            "Credential documents of the node's own instance profile served to pods the node-credentials setting grants them, by grant",
            self.node_credentials_served.clone(),
        );
    }

    pub(super) fn request(
        &self,
        route: &'static str,
        status: u16,
        seconds: f64,
        refusal: Option<&'static str>,
    ) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
        if let Some(reason) = refusal {
            self.refusals.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    pub(super) fn credentials_served(&self, role: &str) {
        self.credentials_served
            .get_or_create(&RoleLabels {
                role: role.to_owned(),
            })
            .inc();
    }

    pub(super) fn node_credentials_served(&self, grant: super::node_credentials::Grant) {
        self.node_credentials_served
            .get_or_create(&GrantLabels { grant: grant.label() })
            .inc();
    }

    pub(super) fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(super) fn request_over_rate(&self, outcome: &'static str) {
        self.over_rate.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(super) fn connection(&self, attributed: bool) {
        let attributed = if attributed { "true" } else { "false" };
        self.connections
            .get_or_create(&ConnectionLabels { attributed })
            .inc();
    }
}
