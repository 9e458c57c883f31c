//! creds::metrics: STS AssumeRole calls by role and result (success, error, timeout, throttled) and their latency;
//! cache lookups (hit, stale, miss), background refreshes and the number of sessions held. Role labels
//! are capped ([`RoleLabelCap`]).

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

use super::StsError;
use crate::telemetry::{ResultLabels, RoleLabelCap};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StsLabels {
    role: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

/// How one AssumeRole call ended.
#[derive(Clone, Copy, Debug)]
pub(super) enum StsResult {
    Success,
    /// STS refused, or could not be reached.
    Error,
    /// No answer within the call's timeout.
    Timeout,
    /// STS refused the call as over its rate.
    Throttled,
}

impl StsResult {
    /// How the call that gave `fetched` ended: the error's variant tells a timeout from a failure.
    pub(super) fn of<T>(fetched: &Result<T, StsError>) -> Self {
        match fetched {
            Ok(_) => Self::Success,
            Err(StsError::Failed { .. }) => Self::Error,
            Err(StsError::TimedOut { .. }) => Self::Timeout,
            Err(StsError::Throttled { .. }) => Self::Throttled,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Success => ResultLabels::outcome(true).result,
            Self::Error => ResultLabels::outcome(false).result,
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
        }
    }
}

/// What a request found in the cache.
#[derive(Clone, Copy, Debug)]
pub(super) enum LookupResult {
    /// A set fit to serve.
    Hit,
    /// A set no longer fit to serve, served while a fresh one is fetched: STS is slow or failing.
    Stale,
    /// No usable set: the request waited for STS.
    Miss,
}

impl LookupResult {
    fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
        }
    }
}

/// 1 ms to about 16 s.
fn sts_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

#[derive(Clone, Debug)]
pub struct CacheMetrics {
    sts_calls: Family<StsLabels, Counter>,
    sts_latency: Family<RoleLabels, Histogram, fn() -> Histogram>,
    lookups: Family<ResultLabels, Counter>,
    refreshes: Family<ResultLabels, Counter>,
    sessions: Gauge,
    roles: RoleLabelCap,
}

impl Default for CacheMetrics {
    fn default() -> Self {
        Self {
            sts_calls: Family::default(),
            sts_latency: Family::new_with_constructor(sts_histogram),
            lookups: Family::default(),
            refreshes: Family::default(),
            sessions: Gauge::default(),
            roles: RoleLabelCap::default(),
        }
    }
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sts_assume_role",
            "STS AssumeRole calls by role ARN (after the first 100, other) and result (success, error, timeout: no answer in time, or throttled: over STS's rate)",
            self.sts_calls.clone(),
        );
        registry.register_with_unit(
            "sts_assume_role_duration",
            "Time AssumeRole calls took, by role ARN (after the first 100, other; a call that timed out counts its timeout)",
            Unit::Seconds,
            self.sts_latency.clone(),
        );
        registry.register(
            "credential_cache_lookups",
            "Credential cache lookups: hit (a set fit to serve), stale (a set past fit, served while STS is called), miss (waited for STS)",
            self.lookups.clone(),
        );
        registry.register(
            "credential_refreshes",
            "Background credential refreshes by result",
            self.refreshes.clone(),
        );
        registry.register(
            "credential_sessions",
            "Sessions the credential cache holds",
            self.sessions.clone(),
        );
    }

    pub(super) fn sts_call(&self, role: &str, result: StsResult, took: Duration) {
        let role = self.roles.of(role);
        self.sts_latency
            .get_or_create(&RoleLabels { role: role.clone() })
            .observe(took.as_secs_f64());
        self.sts_calls
            .get_or_create(&StsLabels {
                role,
                result: result.label(),
            })
            .inc();
    }

    pub(super) fn lookup(&self, result: LookupResult) {
        self.lookups
            .get_or_create(&ResultLabels {
                result: result.label(),
            })
            .inc();
    }

    pub(super) fn refresh(&self, ok: bool) {
        self.refreshes.get_or_create(&ResultLabels::outcome(ok)).inc();
    }

    pub(super) fn sessions(&self, count: usize) {
        self.sessions.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MAX_ROLE_SERIES, OTHER_ROLE};

    #[test]
    fn sts_calls_keep_a_series_for_at_most_the_first_roles() {
        let metrics = CacheMetrics::default();
        for n in 0..MAX_ROLE_SERIES + 50 {
            let role = format!("arn:aws:iam::123456789012:role/assumed-{n}");
            metrics.sts_call(&role, StsResult::Success, Duration::from_millis(20));
        }
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let roles = |prefix: &str| {
            text.lines()
                .filter(|line| line.starts_with(prefix))
                .filter_map(|line| line.split("role=\"").nth(1)?.split('"').next())
                .collect::<std::collections::HashSet<_>>()
        };
        for prefix in [
            "sts_assume_role_total{",
            "sts_assume_role_duration_seconds_count{",
        ] {
            let roles = roles(prefix);
            assert_eq!(roles.len(), MAX_ROLE_SERIES + 1, "{prefix}");
            assert!(roles.contains(OTHER_ROLE), "{prefix}: {text}");
        }
    }
}
