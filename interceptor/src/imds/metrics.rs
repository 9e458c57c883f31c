//! imds::metrics: what the metadata API did: requests by route and status, their latency, refusals by
//! reason, credentials served by role, connections by whether the kernel attributed them,
//! connections closed at accept by the limit they were over, requests over their caller's rate by
//! whether they were held or refused, and answers that carried the node's own credentials by grant.
//! Label values are fixed strings, status codes and role ARNs (the first
//! [`MAX_ROLE_SERIES`](crate::telemetry::MAX_ROLE_SERIES), the others `other`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::telemetry::RoleLabelCap;

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
    roles: RoleLabelCap,
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
            roles: RoleLabelCap::default(),
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
            "Credential documents served, by role ARN (after the first 100, other)",
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
                role: self.roles.of(role),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MAX_ROLE_SERIES, OTHER_ROLE};

    #[test]
    fn credentials_served_keeps_a_series_for_at_most_the_first_roles() {
        let metrics = ImdsMetrics::default();
        for n in 0..MAX_ROLE_SERIES + 50 {
            metrics.credentials_served(&format!("arn:aws:iam::123456789012:role/served-{n}"));
        }
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("credentials_served_total{"))
            .collect();
        assert_eq!(series.len(), MAX_ROLE_SERIES + 1);
        let other = format!(r#"credentials_served_total{{role="{OTHER_ROLE}"}} 50"#);
        assert!(series.contains(&other.as_str()), "{text}");
    }
}
