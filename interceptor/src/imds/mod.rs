//! imds: the instance metadata API the redirected callers see. Answers tokens, the caller's role and
//! credentials, and `iam/info` itself; passes the paths that hold no secret to the node's metadata
//! service ([`route`]), and the node's own credentials to the pods granted them ([`node_credentials`]);
//! refuses everything else with the status the real service would give. Each pod's connections and
//! request rate are bounded ([`limits`], [`rate`]).
//!
//! [`router`] is the whole HTTP API and needs no socket; [`serve`] accepts connections and tags each
//! with what the kernel recorded about its caller.

mod error;
pub mod limits;
pub mod metrics;
pub mod node_credentials;
pub mod rate;
pub mod recent;
pub mod route;
mod serve;
pub mod token;
pub mod upstream;

use std::{
    sync::{Arc, OnceLock},
    time::{Instant, SystemTime},
};

use axum::{
    Extension, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
pub use error::ImdsError;
pub use metrics::ImdsMetrics;
use serde::Serialize;
pub use serve::{Caller, ConnectionBounds, serve};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::BorrowedFormatItem, macros::format_description};
use tower::ServiceExt;

use self::{
    node_credentials::{Entitlement, Grant, NodeCredentials},
    rate::RequestRates,
    recent::{AnsweredRequest, RecentRequests},
    route::{AllowList, Route},
    token::TokenKey,
    upstream::Upstream,
};
use crate::{
    bpf::Attribution,
    creds::{CredentialCache, Credentials},
    identity::{CgroupPath, CgroupResolver},
    policy::{Policy, SessionKey},
    workload::{Workload, WorkloadSource},
};

/// Everything the API consults.
pub struct ImdsState {
    pub cgroups: Arc<dyn CgroupResolver>,
    pub workloads: Arc<dyn WorkloadSource>,
    pub policy: Policy,
    pub creds: Arc<CredentialCache>,
    pub upstream: Arc<dyn Upstream>,
    pub allow: AllowList,
    /// Which pods get the node's own credentials, and which got them.
    pub node_credentials: Arc<NodeCredentials>,
    pub tokens: TokenKey,
    /// Refuse requests without a token (IMDSv2 only).
    pub require_v2: bool,
    pub metrics: ImdsMetrics,
    /// The health server's routes, answered here to callers the kernel did not redirect (the kubelet's
    /// probes, Prometheus) when the health port is the agent's own, as kube2iam's default has it.
    pub node_health: Option<Router>,
    /// The last requests answered, for `interceptor status`.
    pub recent: Arc<RecentRequests>,
    /// Each caller's request budget.
    pub rates: Arc<RequestRates>,
}

/// The paths of the health server.
const HEALTH_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// What the log line and the metrics of one request say, filled in as the request is answered.
#[derive(Default)]
struct RequestRecord {
    route: Option<&'static str>,
    workload: Option<Arc<Workload>>,
    role: Option<String>,
    /// Set when the caller is answered with the node's own credentials.
    node_credentials: Option<Grant>,
}

/// Bound on answering one request, STS call included (the SDKs give up after 1 to 5 seconds).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const FORWARDED_FOR: &str = "x-forwarded-for";

/// The metadata API. Each request must carry a [`Caller`] extension (added by [`serve`]).
pub fn router(state: Arc<ImdsState>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(axum::middleware::map_response(server_header))
        .with_state(state)
}

/// EC2's metadata service names itself so; some tools check.
async fn server_header(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

async fn handle(
    State(state): State<Arc<ImdsState>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Response {
    if let Some(health) = &state.node_health
        && caller.attribution.is_none()
        && HEALTH_PATHS.contains(&request.uri().path())
    {
        return health.clone().oneshot(request).await.into_response();
    }
    let (parts, _) = request.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let started = Instant::now();
    let path = uri.path();
    let mut record = RequestRecord::default();
    let answered = async {
        if let Some(key) = &caller.limit_key {
            state.rates.admit(key).await?;
        }
        answer(&state, &caller, &method, path, &headers, &mut record).await
    };
    let result = tokio::time::timeout(REQUEST_TIMEOUT, answered)
        .await
        .unwrap_or(Err(ImdsError::Timeout));
    let logged_at_info = result.as_ref().is_err_and(ImdsError::logged_each);
    let (response, refusal) = match result {
        Ok(response) => (response, None),
        Err(err) => {
            let message = crate::error_chain(&err);
            if let (Some(refusal), Some(workload)) = (err.refusal(), &record.workload) {
                state.workloads.refused(workload, refusal, &message);
            }
            let refusal = (err.reason(), message);
            (err.into_response(), Some(refusal))
        }
    };
    let latency = started.elapsed();
    let route = record.route.unwrap_or(route::UNROUTED);
    let status = response.status().as_u16();
    let reason = refusal.as_ref().map(|(reason, _)| *reason);
    state
        .metrics
        .request(route, status, latency.as_secs_f64(), reason);
    // One line per request, never a token or a key: only names, ids and the path. A refusal is
    // logged at info: each is something an operator may have to act on. An answered request is logged
    // at debug: at info, formatting and writing its line was a quarter of the agent's time per
    // cached-credentials request; the metrics count answered requests, and `interceptor status` shows
    // the last ones. So is a throttled one, which `rate` sums up at info per caller.
    macro_rules! request_line {
        ($level:expr) => {
            tracing::event!(
                $level,
                peer = %caller.peer,
                cgroup_id = caller.attribution.map(|found| found.cgroup_id.0),
                workload = record.workload.as_ref().map(|workload| workload.name.as_str()),
                role = record.role.as_deref(),
                node_credentials = record.node_credentials.map(Grant::label),
                %method,
                path = %crate::bounded(path),
                route,
                status,
                latency_us = latency.as_micros() as u64,
                reason,
                error = refusal.as_ref().map(|(_, error)| error.as_str()),
                "metadata request"
            )
        };
    }
    if logged_at_info {
        request_line!(tracing::Level::INFO);
    } else {
        request_line!(tracing::Level::DEBUG);
    }
    // What the log line said, moved (not copied) into the ring.
    state.recent.record(AnsweredRequest {
        at: SystemTime::now(),
        caller: caller.attribution,
        workload: record.workload,
        role: record.role,
        node_credentials: record.node_credentials,
        route,
        status,
        refusal,
    });
    response
}

async fn answer(
    state: &ImdsState,
    caller: &Caller,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    record: &mut RequestRecord,
) -> Result<Response, ImdsError> {
    let attribution = caller.attribution.ok_or(ImdsError::Unattributed)?;
    let route = route::route(method, path, &state.allow)?;
    record.route = Some(route.label());
    if route == Route::Token {
        return mint_token(state, &attribution, headers);
    }
    check_token(state, &attribution, headers)?;
    if let Route::Proxy { path } = &route {
        return proxy(state, path).await;
    }
    // The `meta-data/iam` paths: answered for the caller's workload.
    let workload = workload_of(state, &attribution, &caller.cgroup_path).await?;
    record.workload = Some(workload.clone());
    match state.node_credentials.entitlement(&workload) {
        Entitlement::Node(grant) => {
            record.node_credentials = Some(grant);
            return node_iam(state, &workload, grant, &route, path).await;
        }
        Entitlement::Nothing => return Err(ImdsError::HostNetworkWithoutRole),
        Entitlement::Policy => {}
    }
    if route == Route::IamIndex {
        return Ok(text("info\nsecurity-credentials/"));
    }
    let session = state.policy.session(&workload.request, &workload.session_name)?;
    record.role = Some(session.role.to_string());
    match route {
        Route::Token | Route::Proxy { .. } | Route::IamIndex => unreachable!("answered above"),
        Route::IamInfo => Ok(json(&IamInfo::of(&session))),
        Route::RoleList { .. } => Ok(text(session.role.name())),
        Route::RoleCredentials { extended, role_name } => {
            if role_name != session.role.name() {
                return Err(ImdsError::OtherRole { asked: role_name });
            }
            let creds = state.creds.get(&session).await?;
            state.metrics.credentials_served(session.role.as_str());
            let document = creds.documents.get_or_render(extended, || {
                let account_id = extended.then(|| session.role.account_id());
                render_json(&CredentialsDocument::of(&creds, account_id))
            });
            Ok(text_response(document))
        }
    }
}

fn mint_token(state: &ImdsState, caller: &Attribution, headers: &HeaderMap) -> Result<Response, ImdsError> {
    if headers.contains_key(FORWARDED_FOR) {
        return Err(ImdsError::ForwardedFor);
    }
    let ttl = token::parse_ttl(headers.get(TOKEN_TTL_HEADER).map(HeaderValue::as_bytes))?;
    let token = state.tokens.mint(caller.cgroup_id, ttl, SystemTime::now());
    let mut response = text(&token);
    // aws-sdk-go-v2 and aws-sdk-rust read the TTL back from this header; without it they get nothing.
    response
        .headers_mut()
        .insert(TOKEN_TTL_HEADER, HeaderValue::from(ttl.as_secs()));
    Ok(response)
}

/// A token, when sent, must be valid and the caller's; without one the request is IMDSv1, allowed unless
/// v2 is required.
fn check_token(state: &ImdsState, caller: &Attribution, headers: &HeaderMap) -> Result<(), ImdsError> {
    match headers.get(TOKEN_HEADER) {
        Some(token) => Ok(state
            .tokens
            .verify(token.as_bytes(), caller.cgroup_id, SystemTime::now())?),
        None if state.require_v2 => Err(ImdsError::TokenRequired),
        None => Ok(()),
    }
}

/// The caller's workload, from its cgroup's path: resolved once per connection, into `cgroup_path`.
async fn workload_of(
    state: &ImdsState,
    caller: &Attribution,
    cgroup_path: &OnceLock<CgroupPath>,
) -> Result<Arc<Workload>, ImdsError> {
    let cgroup = match cgroup_path.get() {
        Some(cgroup) => cgroup,
        None => {
            let resolved = state
                .cgroups
                .path_of(caller.cgroup_id)
                .map_err(ImdsError::Identity)?;
            cgroup_path.get_or_init(|| resolved)
        }
    };
    Ok(state.workloads.workload_for(cgroup).await?)
}

async fn proxy(state: &ImdsState, path: &str) -> Result<Response, ImdsError> {
    let reply = state.upstream.get(path).await.map_err(ImdsError::Upstream)?;
    let mut response = (reply.status, reply.body).into_response();
    let content_type = reply
        .content_type
        .unwrap_or(HeaderValue::from_static("text/plain"));
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    Ok(response)
}

/// A `meta-data/iam` path of a pod granted the node's credentials: the node's metadata service answers
/// it (the index, `info`, the role list, the role's document, `-extended` as the node has it), read
/// with the agent's own token. An answer that carries the credentials is counted and recorded.
async fn node_iam(
    state: &ImdsState,
    workload: &Workload,
    grant: Grant,
    route: &Route,
    path: &str,
) -> Result<Response, ImdsError> {
    let response = proxy(state, path).await?;
    if matches!(route, Route::RoleCredentials { .. })
        && response.status() == StatusCode::OK
        && let Some(pod) = &workload.pod
    {
        state.metrics.node_credentials_served(grant);
        state.node_credentials.served(pod, grant);
    }
    Ok(response)
}

fn text(body: &str) -> Response {
    text_response(Bytes::copy_from_slice(body.as_bytes()))
}

fn text_response(body: Bytes) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// EC2 serves its JSON documents as `text/plain`, pretty-printed.
fn json(document: &impl Serialize) -> Response {
    text_response(render_json(document))
}

fn render_json(document: &impl Serialize) -> Bytes {
    serde_json::to_vec_pretty(document)
        .expect("documents serialize")
        .into()
}

const IMDS_TIME: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

fn imds_time(time: SystemTime) -> String {
    OffsetDateTime::from(time)
        .format(IMDS_TIME)
        .expect("UTC times format")
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDocument<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

impl<'a> CredentialsDocument<'a> {
    fn of(creds: &'a Credentials, account_id: Option<&'a str>) -> Self {
        Self {
            code: "Success",
            last_updated: imds_time(creds.issued),
            kind: "AWS-HMAC",
            access_key_id: &creds.access_key_id,
            secret_access_key: creds.secret_access_key.expose(),
            token: creds.session_token.expose(),
            expiration: imds_time(creds.expiration),
            account_id,
        }
    }
}

/// `iam/info` for the caller's role: an instance profile named after the role, in the role's account.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct IamInfo {
    code: &'static str,
    last_updated: String,
    instance_profile_arn: String,
    instance_profile_id: String,
}

impl IamInfo {
    fn of(session: &SessionKey) -> Self {
        let role = &session.role;
        let digest = Sha256::digest(role.as_str().as_bytes());
        // Instance profile ids are "AIPA" and 17 upper-case alphanumerics; derived from the role so the
        // same role always shows the same id.
        let id: String = digest
            .iter()
            .take(17)
            .map(|b| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[usize::from(b % 32)]))
            .collect();
        Self {
            code: "Success",
            last_updated: imds_time(SystemTime::now()),
            instance_profile_arn: format!(
                "arn:{}:iam::{}:instance-profile/{}",
                role.partition(),
                role.account_id(),
                role.name()
            ),
            instance_profile_id: format!("AIPA{id}"),
        }
    }
}

#[cfg(test)]
mod tests;
