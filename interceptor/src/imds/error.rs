//! imds::error: every way a metadata request is refused, each with its status code, a plain-text body
//! for the caller and a short reason for logs and metrics.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{route::RouteError, token::TokenError};
use crate::{
    creds::StsError,
    identity::CgroupError,
    policy::{Limit, PolicyError},
    workload::{Refusal, WorkloadError},
};

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("connection not attributed to a workload: only connections redirected by the kernel are served")]
    Unattributed,
    #[error("token requests through a proxy (X-Forwarded-For) are refused")]
    ForwardedFor,
    #[error(transparent)]
    BadTtl(#[from] super::token::BadTtl),
    #[error("an IMDSv2 token is required")]
    TokenRequired,
    #[error(transparent)]
    BadToken(#[from] TokenError),
    #[error("cannot identify the calling cgroup")]
    Identity(#[source] CgroupError),
    #[error(transparent)]
    UnknownWorkload(#[from] WorkloadError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "the hostNetwork pod names no role, and --host-network-credentials none gives such pods no credentials"
    )]
    HostNetworkWithoutRole,
    #[error("role {} is not this workload's role", crate::Echo(.asked))]
    OtherRole { asked: String },
    #[error(transparent)]
    Sts(#[from] StsError),
    #[error("the node's metadata service cannot be reached")]
    Upstream(#[source] super::upstream::UpstreamError),
    #[error("the request took too long")]
    Timeout,
    #[error(transparent)]
    Throttled(#[from] super::rate::Throttled),
}

/// How long a caller should wait before asking again after an STS failure.
const STS_RETRY_AFTER_SECONDS: u32 = 5;
/// How long a pod the API server has not delivered yet should wait before asking again.
const POD_RETRY_AFTER_SECONDS: u32 = 1;
/// How long a caller over its rate should wait: by then its budget has room again (at 1 a second or
/// more), and the SDKs that retry a 429 at all do so with backoff of their own.
const THROTTLED_RETRY_AFTER_SECONDS: u32 = 1;

impl ImdsError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Route(RouteError::BadPath) | Self::BadTtl(_) => StatusCode::BAD_REQUEST,
            Self::Route(RouteError::VersionedToken | RouteError::Denied | RouteError::NodeOnly)
            | Self::Unattributed
            | Self::ForwardedFor => StatusCode::FORBIDDEN,
            Self::Route(RouteError::MethodNotAllowed) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnknownWorkload(
                WorkloadError::PodNotKnown { .. } | WorkloadError::ServiceAccountNotKnown { .. },
            ) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownWorkload(WorkloadError::MirrorContested { .. }) => StatusCode::FORBIDDEN,
            Self::Route(RouteError::NotFound) | Self::UnknownWorkload(_) | Self::OtherRole { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::Policy(PolicyError::NoRole) | Self::HostNetworkWithoutRole => StatusCode::NOT_FOUND,
            Self::Policy(_) => StatusCode::FORBIDDEN,
            Self::TokenRequired | Self::BadToken(_) => StatusCode::UNAUTHORIZED,
            Self::Identity(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Sts(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// What the workload's source should be told about this refusal (a Kubernetes Event on the pod).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Policy(PolicyError::BadRequest { .. }) => Some(Refusal::BadAnnotation),
            Self::Policy(PolicyError::BadTags(_)) => Some(Refusal::BadSessionTags),
            Self::Policy(PolicyError::NotAllowed { .. } | PolicyError::BadRestriction { .. }) => {
                Some(Refusal::NamespaceRestricted)
            }
            Self::Sts(StsError::Failed { .. }) => Some(Refusal::AssumeRoleFailed),
            _ => None,
        }
    }

    /// A fixed label per kind of refusal, for logs now and metrics later.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Route(RouteError::BadPath) => "bad_path",
            Self::Route(RouteError::VersionedToken) => "versioned_token",
            Self::Route(RouteError::MethodNotAllowed) => "method_not_allowed",
            Self::Route(RouteError::NotFound) => "not_found",
            Self::Route(RouteError::Denied) => "proxy_denied",
            Self::Route(RouteError::NodeOnly) => "node_secret",
            Self::Unattributed => "unattributed",
            Self::ForwardedFor => "forwarded_for",
            Self::BadTtl(_) => "bad_ttl",
            Self::TokenRequired | Self::BadToken(_) => "bad_token",
            Self::Identity(_) => "identity_error",
            Self::UnknownWorkload(WorkloadError::Unknown(_)) => "unknown_workload",
            Self::UnknownWorkload(WorkloadError::PodNotKnown { .. }) => "pod_not_known",
            Self::UnknownWorkload(WorkloadError::ServiceAccountNotKnown { .. }) => "serviceaccount_not_known",
            Self::UnknownWorkload(WorkloadError::PodDeleted { .. }) => "pod_deleted",
            Self::UnknownWorkload(WorkloadError::PodFinished { .. }) => "pod_finished",
            Self::UnknownWorkload(WorkloadError::MirrorContested { .. }) => "mirror_contested",
            Self::Policy(PolicyError::NoRole) | Self::HostNetworkWithoutRole => "no_role",
            Self::Policy(PolicyError::BadRequest { problem, .. }) => match **problem {
                PolicyError::BadExternalId(_) | PolicyError::TooLong(Limit::ExternalId) => {
                    "invalid_external_id"
                }
                PolicyError::TooLong(Limit::SessionName) => "invalid_session_name",
                _ => "invalid_role",
            },
            Self::Policy(PolicyError::BadTags(_)) => "bad_session_tags",
            Self::Policy(PolicyError::NotAllowed { .. }) => "namespace_restricted",
            Self::Policy(PolicyError::BadRestriction { .. }) => "bad_namespace_restriction",
            Self::Policy(_) => "role_not_allowed",
            Self::OtherRole { .. } => "other_role",
            Self::Sts(StsError::Failed { .. }) => "sts_error",
            Self::Sts(StsError::TimedOut { .. }) => "sts_timeout",
            Self::Sts(StsError::Throttled { .. }) => "sts_throttled",
            Self::Upstream(_) => "upstream_error",
            Self::Timeout => "timeout",
            Self::Throttled(_) => "throttled",
        }
    }

    /// Whether the refusal makes an info line of its own. A throttled request does not: a flooding
    /// caller would flood the log too. [`super::rate`] logs those at most every 10 s per caller.
    pub fn logged_each(&self) -> bool {
        !matches!(self, Self::Throttled(_))
    }
}

impl IntoResponse for ImdsError {
    fn into_response(self) -> Response {
        let status = self.status();
        // The caller learns the kind of refusal; details (role ARNs, STS messages) stay in the agent's log.
        let body = match &self {
            Self::Sts(_) => "credentials are temporarily unavailable".to_owned(),
            Self::Identity(_) => "cannot identify the caller".to_owned(),
            Self::Upstream(_) => "the metadata service cannot be reached".to_owned(),
            Self::UnknownWorkload(WorkloadError::PodNotKnown { .. }) => {
                "this pod is not known yet; ask again".to_owned()
            }
            Self::UnknownWorkload(WorkloadError::ServiceAccountNotKnown { .. }) => {
                "this pod's ServiceAccount is not known yet; ask again".to_owned()
            }
            Self::UnknownWorkload(_) => "no role is known for this workload".to_owned(),
            Self::Policy(PolicyError::NoRole) | Self::HostNetworkWithoutRole => {
                "this workload has no role".to_owned()
            }
            other => other.to_string(),
        };
        let retry_after = match &self {
            Self::Sts(_) => Some(STS_RETRY_AFTER_SECONDS),
            Self::UnknownWorkload(
                WorkloadError::PodNotKnown { .. } | WorkloadError::ServiceAccountNotKnown { .. },
            ) => Some(POD_RETRY_AFTER_SECONDS),
            Self::Throttled(_) => Some(THROTTLED_RETRY_AFTER_SECONDS),
            _ => None,
        };
        let mut response = (status, body).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_timed_out_sts_call_has_its_own_reason_and_the_same_answer_as_a_failure() {
        let role = "arn:aws:iam::123456789012:role/app".to_owned();
        let failed = ImdsError::Sts(StsError::Failed {
            role: role.clone(),
            message: "down".to_owned(),
        });
        let timed_out = ImdsError::Sts(StsError::TimedOut {
            role,
            after: Duration::from_secs(2),
        });
        assert_eq!(failed.reason(), "sts_error");
        assert_eq!(timed_out.reason(), "sts_timeout");
        for err in [failed, timed_out] {
            let response = err.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        }
    }
}
