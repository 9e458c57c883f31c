//! The metadata API through `oneshot`: every route and status, with fakes for the kernel's attribution,
//! the workload source, STS and the node's metadata service.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    body::{Body, Bytes},
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use interceptor_common::{CgroupId, NetnsCookie, SocketCookie};
use tower::ServiceExt;

use super::{
    limits::LimitKey,
    rate::{MAX_HOLD, RequestQuota},
    upstream::UpstreamReply,
    *,
};
use crate::{
    creds::{AssumeRole, Documents, Secret, StsError},
    identity::{CgroupError, CgroupPath},
    policy::{BaseArn, RoleRequest},
    workload::{PodRef, WorkloadError},
};

const APP: CgroupId = CgroupId(100);
const OTHER_APP: CgroupId = CgroupId(101);
const NO_ROLE: CgroupId = CgroupId(102);
const STRANGER: CgroupId = CgroupId(103);
/// A hostNetwork pod that names no role (the VPC CNI's aws-node, say).
const DAEMON: CgroupId = CgroupId(104);
/// A pod (not hostNetwork) of a ServiceAccount the node-credentials setting names.
const CSI: CgroupId = CgroupId(105);
/// A hostNetwork pod that names a role.
const HOST_APP: CgroupId = CgroupId(106);
/// Workloads whose requests are over AWS's limits, or not valid and long: see [`hostile_requests`].
const HOSTILE: [CgroupId; 4] = [CgroupId(110), CgroupId(111), CgroupId(112), CgroupId(113)];

struct Cgroups;

impl CgroupResolver for Cgroups {
    fn path_of(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError> {
        match cgroup_id {
            APP => Ok(CgroupPath::new("system.slice/app.service")),
            OTHER_APP => Ok(CgroupPath::new("system.slice/other.service")),
            NO_ROLE => Ok(CgroupPath::new("system.slice/norole.service")),
            STRANGER => Ok(CgroupPath::new("system.slice/stranger.service")),
            DAEMON => Ok(CgroupPath::new("kubepods.slice/daemon")),
            CSI => Ok(CgroupPath::new("kubepods.slice/csi")),
            HOST_APP => Ok(CgroupPath::new("kubepods.slice/host-app")),
            id if HOSTILE.contains(&id) => Ok(CgroupPath::new(&hostile_path(id))),
            _ => Err(CgroupError::UnknownId(cgroup_id.0)),
        }
    }
}

struct Workloads(HashMap<String, Arc<Workload>>);

#[async_trait::async_trait]
impl WorkloadSource for Workloads {
    async fn workload_for(&self, cgroup: &CgroupPath) -> Result<Arc<Workload>, WorkloadError> {
        self.0
            .get(cgroup.as_str())
            .cloned()
            .ok_or_else(|| WorkloadError::Unknown(cgroup.clone()))
    }
}

fn workload(name: &str, role: Option<&str>) -> Arc<Workload> {
    Arc::new(Workload {
        name: format!("static/{name}"),
        session_name: format!("static/{name}"),
        request: RoleRequest {
            role: role.map(str::to_owned),
            ..RoleRequest::default()
        },
        pod: None,
    })
}

fn pod(name: &str, account: &str, host_network: bool, role: Option<&str>) -> Arc<Workload> {
    let workload = workload(name, role);
    Arc::new(Workload {
        name: format!("kube-system/{name}"),
        pod: Some(PodRef {
            namespace: "kube-system".to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            host_network,
            service_account: account.to_owned(),
        }),
        ..(*workload).clone()
    })
}

/// The node's credentials document, as its metadata service serves it.
const NODE_CREDENTIALS: &str = r#"{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIANODE","SecretAccessKey":"node-secret","Token":"node-token","Expiration":"2030-01-01T00:00:00Z"}"#;

fn hostile_path(id: CgroupId) -> String {
    format!("system.slice/hostile-{}.service", id.0)
}

/// The requests of the [`HOSTILE`] workloads, as an annotation could state them.
fn hostile_requests() -> [RoleRequest; 4] {
    let request = RoleRequest {
        role: Some("app".to_owned()),
        origin: Some("annotation iam.amazonaws.com/role of pod team/hostile".into()),
        ..RoleRequest::default()
    };
    [
        RoleRequest {
            role: Some("r".repeat(2049)),
            ..request.clone()
        },
        RoleRequest {
            external_id: Some("x".repeat(1225)),
            ..request.clone()
        },
        RoleRequest {
            session_name: Some("s".repeat(65)),
            ..request.clone()
        },
        RoleRequest {
            role: Some(format!("{}!", "r".repeat(2000))),
            ..request
        },
    ]
}

/// Hands out keys named after the role; fails while `down` is set.
#[derive(Default)]
struct Sts {
    down: AtomicBool,
}

#[async_trait::async_trait]
impl AssumeRole for Sts {
    async fn assume_role(&self, session: &SessionKey, duration: Duration) -> Result<Credentials, StsError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StsError::Failed {
                role: session.role.to_string(),
                message: "connection refused".to_owned(),
            });
        }
        let issued = SystemTime::now();
        Ok(Credentials {
            access_key_id: format!("ASIA-{}", session.role.name()),
            secret_access_key: Secret::new(format!("secret-of-{}", session.role.name())),
            session_token: Secret::new(format!("token-of-{}", session.role.name())),
            issued,
            expiration: issued + duration,
            documents: Documents::default(),
        })
    }
}

/// Records the paths it is asked for; holds the node's role and its credentials, and no
/// `-extended` documents (404, as EC2's metadata service).
#[derive(Default)]
struct Node {
    asked: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Upstream for Node {
    async fn get(&self, path: &str) -> Result<UpstreamReply, upstream::UpstreamError> {
        self.asked.lock().unwrap().push(path.to_owned());
        let below_version = path.splitn(3, '/').nth(2).unwrap_or_default();
        let (status, body) = match below_version.strip_prefix("meta-data/iam") {
            Some("/security-credentials/") => (StatusCode::OK, "node-role"),
            Some("/security-credentials/node-role") => (StatusCode::OK, NODE_CREDENTIALS),
            Some("/info") => (StatusCode::OK, r#"{"InstanceProfileArn":"node-profile"}"#),
            Some("/") => (StatusCode::OK, "info\nsecurity-credentials/"),
            Some(_) => (StatusCode::NOT_FOUND, "not found"),
            None => (StatusCode::OK, "i-0123456789abcdef0"),
        };
        Ok(UpstreamReply {
            status,
            content_type: None,
            body: Bytes::from_static(body.as_bytes()),
        })
    }
}

struct Api {
    router: Router,
    sts: Arc<Sts>,
    node: Arc<Node>,
    recent: Arc<RecentRequests>,
    node_credentials: Arc<NodeCredentials>,
    metrics: ImdsMetrics,
}

impl Api {
    fn new(require_v2: bool) -> Self {
        Self::with_quota(require_v2, RequestQuota::default())
    }

    fn with_quota(require_v2: bool, quota: RequestQuota) -> Self {
        Self::build(require_v2, quota, NodeCredentials::default())
    }

    /// The API with the node-credentials setting `setting` and its defaults otherwise.
    fn with_node_credentials(setting: NodeCredentials) -> Self {
        Self::build(false, RequestQuota::default(), setting)
    }

    fn build(require_v2: bool, quota: RequestQuota, node_credentials: NodeCredentials) -> Self {
        let sts = Arc::new(Sts::default());
        let node = Arc::new(Node::default());
        let recent = Arc::new(RecentRequests::default());
        let mut workloads: HashMap<String, Arc<Workload>> = [
            ("system.slice/app.service", workload("app", Some("app"))),
            ("system.slice/other.service", workload("other", Some("other"))),
            ("system.slice/norole.service", workload("norole", None)),
            ("kubepods.slice/daemon", pod("aws-node-x", "aws-node", true, None)),
            (
                "kubepods.slice/csi",
                pod("ebs-csi-node-x", "ebs-csi-node", false, None),
            ),
            (
                "kubepods.slice/host-app",
                pod("host-app", "default", true, Some("app")),
            ),
        ]
        .into_iter()
        .map(|(path, workload)| (path.to_owned(), workload))
        .collect();
        for (id, request) in HOSTILE.into_iter().zip(hostile_requests()) {
            let hostile = Workload {
                request,
                ..(*workload("hostile", None)).clone()
            };
            workloads.insert(hostile_path(id), Arc::new(hostile));
        }
        let workloads = Workloads(workloads);
        let node_credentials = Arc::new(node_credentials);
        let metrics = ImdsMetrics::default();
        let state = ImdsState {
            cgroups: Arc::new(Cgroups),
            workloads: Arc::new(workloads),
            policy: Policy {
                base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").unwrap()),
                default_role: None,
            },
            creds: Arc::new(CredentialCache::new(sts.clone(), Duration::from_secs(3600), 100)),
            upstream: node.clone(),
            allow: AllowList::default_paths(),
            node_credentials: node_credentials.clone(),
            tokens: TokenKey::random(),
            require_v2,
            metrics: metrics.clone(),
            node_health: None,
            recent: recent.clone(),
            rates: Arc::new(RequestRates::new(quota, ImdsMetrics::default())),
        };
        Self {
            router: router(Arc::new(state)),
            sts,
            node,
            recent,
            node_credentials,
            metrics,
        }
    }

    async fn send(&self, from: Option<CgroupId>, request: Request<Body>) -> Reply {
        let mut request = request;
        request.extensions_mut().insert(Caller::new(
            SocketAddr::from(([10, 0, 0, 7], 40000)),
            from.map(|cgroup_id| Attribution {
                cgroup_id,
                socket_cookie: SocketCookie(1),
                netns_cookie: NetnsCookie(1),
                pid: 1,
                original_dst: crate::bpf::METADATA_V4,
            }),
            from.map(LimitKey::Cgroup),
        ));
        let response = self.router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap(),
        }
    }

    async fn get(&self, from: CgroupId, path: &str) -> Reply {
        self.send(Some(from), Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn get_with_token(&self, from: CgroupId, path: &str, token: &str) -> Reply {
        let request = Request::get(path)
            .header(TOKEN_HEADER, token)
            .body(Body::empty())
            .unwrap();
        self.send(Some(from), request).await
    }

    async fn token(&self, from: CgroupId, ttl: &str) -> Reply {
        let request = Request::put("/latest/api/token")
            .header("X-aws-ec2-metadata-token-ttl-seconds", ttl)
            .body(Body::empty())
            .unwrap();
        self.send(Some(from), request).await
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn unattributed_connections_get_403_on_every_path() {
    let api = Api::new(false);
    for request in [
        Request::get(CREDS).body(Body::empty()).unwrap(),
        Request::get("/latest/meta-data/instance-id")
            .body(Body::empty())
            .unwrap(),
        Request::put("/latest/api/token")
            .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
            .body(Body::empty())
            .unwrap(),
    ] {
        let reply = api.send(None, request).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert!(!reply.body.contains("ASIA"));
    }
    assert!(api.node.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn token_put_echoes_the_ttl_and_checks_its_inputs() {
    let api = Api::new(false);
    let reply = api.token(APP, "21600").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers[TOKEN_TTL_HEADER], "21600");
    assert_eq!(reply.headers[header::SERVER], "EC2ws");
    assert!(reply.body.len() > 40);

    for ttl in ["0", "21601", "soon"] {
        assert_eq!(api.token(APP, ttl).await.status, StatusCode::BAD_REQUEST, "{ttl}");
    }
    let no_ttl = Request::put("/latest/api/token").body(Body::empty()).unwrap();
    assert_eq!(api.send(Some(APP), no_ttl).await.status, StatusCode::BAD_REQUEST);
    let proxied = Request::put("/latest/api/token")
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .header("X-Forwarded-For", "10.0.0.9")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(Some(APP), proxied).await.status, StatusCode::FORBIDDEN);
    let versioned = Request::put("/2021-03-23/api/token")
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.send(Some(APP), versioned).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_token_is_bound_to_the_workload_that_got_it() {
    let api = Api::new(true);
    let token = api.token(APP, "60").await.body;
    assert_eq!(api.get_with_token(APP, CREDS, &token).await.body, "app");
    let stolen = api.get_with_token(OTHER_APP, CREDS, &token).await;
    assert_eq!(stolen.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.get_with_token(APP, CREDS, "forged").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn v1_is_allowed_unless_v2_is_required() {
    assert_eq!(Api::new(false).get(APP, CREDS).await.body, "app");
    let required = Api::new(true).get(APP, CREDS).await;
    assert_eq!(required.status, StatusCode::UNAUTHORIZED);
    // A bad token is refused even where v1 is allowed, as EC2 does.
    assert_eq!(
        Api::new(false).get_with_token(APP, CREDS, "forged").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn role_list_answers_with_and_without_the_slash() {
    let api = Api::new(false);
    for path in [
        "/latest/meta-data/iam/security-credentials",
        CREDS,
        "/latest/meta-data/iam/security-credentials-extended",
        "/latest/meta-data/iam/security-credentials-extended/",
    ] {
        let reply = api.get(APP, path).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "app"),
            "{path}"
        );
        assert_eq!(reply.headers[header::CONTENT_TYPE], "text/plain");
    }
    assert_eq!(api.get(OTHER_APP, CREDS).await.body, "other");
}

#[tokio::test]
async fn credentials_in_the_imds_format() {
    let api = Api::new(false);
    let reply = api.get(APP, &format!("{CREDS}app")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    assert_eq!(doc["AccessKeyId"], "ASIA-app");
    assert_eq!(doc["SecretAccessKey"], "secret-of-app");
    assert_eq!(doc["Token"], "token-of-app");
    assert!(doc.get("AccountId").is_none());
    for field in ["LastUpdated", "Expiration"] {
        let time = doc[field].as_str().unwrap();
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{field}: {time}"
        );
    }
    let extended = api
        .get(APP, "/latest/meta-data/iam/security-credentials-extended/app")
        .await;
    let doc: serde_json::Value = serde_json::from_str(&extended.body).unwrap();
    assert_eq!(doc["AccountId"], "123456789012");
    assert_eq!(doc["AccessKeyId"], "ASIA-app");
}

#[tokio::test]
async fn another_roles_name_gets_404_and_no_keys() {
    let api = Api::new(false);
    let reply = api.get(APP, &format!("{CREDS}other")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(!reply.body.contains("ASIA"));
}

#[tokio::test]
async fn requests_over_aws_limits_are_refused_with_a_reason_and_no_value_is_echoed_whole() {
    let api = Api::new(false);
    let mut reasons = Vec::new();
    for id in HOSTILE {
        let reply = api.get(id, CREDS).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
        assert!(reply.body.len() < 400, "{}", reply.body);
        let newest = &api.recent.newest_first()[0];
        let (reason, message) = newest.refusal.clone().unwrap();
        assert!(message.len() < 400, "{message}");
        reasons.push(reason);
    }
    assert_eq!(
        reasons,
        [
            "invalid_role",
            "invalid_external_id",
            "invalid_session_name",
            "invalid_role"
        ]
    );
    assert!(
        api.get(HOSTILE[3], CREDS)
            .await
            .body
            .contains("… (2001 characters) is not valid"),
        "a value within its limit is quoted cut, with its length"
    );
    // A role name in the path, as long as a request head may be.
    let asked = "o".repeat(15_000);
    let reply = api.get(APP, &format!("{CREDS}{asked}")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let (reason, message) = api.recent.newest_first()[0].refusal.clone().unwrap();
    assert_eq!(reason, "other_role");
    assert!(
        message.len() < 200 && message.contains("(15000 characters)"),
        "{message}"
    );
}

#[tokio::test]
async fn iam_info_describes_the_callers_role() {
    let api = Api::new(false);
    let reply = api.get(APP, "/latest/meta-data/iam/info").await;
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(
        doc["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/app"
    );
    let id = doc["InstanceProfileId"].as_str().unwrap();
    assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    assert_eq!(
        api.get(APP, "/latest/meta-data/iam/").await.body,
        "info\nsecurity-credentials/"
    );
}

#[tokio::test]
async fn unknown_workloads_and_workloads_without_a_role_get_404() {
    let api = Api::new(false);
    for cgroup in [STRANGER, NO_ROLE] {
        for path in [
            CREDS.to_owned(),
            format!("{CREDS}app"),
            "/latest/meta-data/iam/info".to_owned(),
        ] {
            let reply = api.get(cgroup, &path).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{cgroup:?} {path}");
            assert!(!reply.body.contains("ASIA"));
        }
    }
    let unresolvable = api.get(CgroupId(999), CREDS).await;
    assert_eq!(unresolvable.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn sts_failure_is_a_503_with_retry_after_and_no_keys() {
    let api = Api::new(false);
    api.sts.down.store(true, Ordering::SeqCst);
    let reply = api.get(APP, &format!("{CREDS}app")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers[header::RETRY_AFTER], "5");
    assert!(!reply.body.contains("ASIA") && !reply.body.contains("secret"));
}

#[tokio::test]
async fn allowed_paths_are_proxied_and_node_only_paths_never_are() {
    let api = Api::new(false);
    let reply = api.get(APP, "/latest/meta-data/instance-id").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "i-0123456789abcdef0")
    );
    assert_eq!(reply.headers[header::SERVER], "EC2ws");
    for path in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/signature",
    ] {
        assert_eq!(api.get(APP, path).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(
        *api.node.asked.lock().unwrap(),
        vec!["/latest/meta-data/instance-id".to_owned()]
    );
}

#[tokio::test]
async fn bad_methods_and_paths() {
    let api = Api::new(false);
    let post = Request::post(CREDS).body(Body::empty()).unwrap();
    assert_eq!(
        api.send(Some(APP), post).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        api.get(APP, "/latest/meta-data/%2e%2e/user-data").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(api.get(APP, "/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn answered_requests_are_remembered_newest_first_with_who_and_what_but_no_secret() {
    let api = Api::new(false);
    let served = api.get(APP, &format!("{CREDS}app")).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(api.get(STRANGER, CREDS).await.status, StatusCode::NOT_FOUND);
    let unattributed = Request::get(CREDS).body(Body::empty()).unwrap();
    assert_eq!(api.send(None, unattributed).await.status, StatusCode::FORBIDDEN);

    let recent = api.recent.newest_first();
    let summary: Vec<_> = recent
        .iter()
        .map(|request| {
            (
                request.caller.map(|caller| caller.cgroup_id),
                request.workload.as_ref().map(|workload| workload.name.as_str()),
                request.role.as_deref(),
                request.status,
                request.refusal.as_ref().map(|(reason, _)| *reason),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (None, None, None, 403, Some("unattributed")),
            (Some(STRANGER), None, None, 404, Some("unknown_workload")),
            (
                Some(APP),
                Some("static/app"),
                Some("arn:aws:iam::123456789012:role/app"),
                200,
                None
            ),
        ]
    );
    let doc: serde_json::Value = serde_json::from_str(&served.body).unwrap();
    let remembered = format!("{recent:?}");
    for field in ["AccessKeyId", "SecretAccessKey", "Token"] {
        let secret = doc[field].as_str().unwrap();
        assert!(!remembered.contains(secret), "{field} remembered: {remembered}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_over_its_rate_gets_429_with_retry_after_after_the_hold_and_others_are_answered() {
    // One a second, no burst beyond the first request: the second is more than MAX_HOLD away.
    let quota = RequestQuota {
        per_second: std::num::NonZeroU32::MIN,
        burst: std::num::NonZeroU32::MIN,
    };
    let api = Api::with_quota(false, quota);
    assert_eq!(api.get(APP, CREDS).await.status, StatusCode::OK);
    let asked = tokio::time::Instant::now();
    let throttled = api.get(APP, &format!("{CREDS}app")).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        tokio::time::Instant::now(),
        asked + MAX_HOLD,
        "held, then refused"
    );
    assert_eq!(throttled.headers[header::RETRY_AFTER], "1");
    assert!(!throttled.body.contains("ASIA"), "{}", throttled.body);
    assert!(throttled.body.contains("rate limit"), "{}", throttled.body);
    assert_eq!(
        api.recent.newest_first()[0]
            .refusal
            .as_ref()
            .map(|(reason, _)| *reason),
        Some("throttled")
    );

    // Another caller has a budget of its own.
    assert_eq!(api.get(OTHER_APP, CREDS).await.body, "other");
    // A second later the caller's budget has room again.
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    assert_eq!(api.get(APP, CREDS).await.body, "app");
}

/// Which paths the node's metadata service was asked for below `meta-data/iam`.
fn iam_paths_asked(api: &Api) -> Vec<String> {
    let asked = api.node.asked.lock().unwrap();
    asked
        .iter()
        .filter(|path| path.contains("/iam"))
        .cloned()
        .collect()
}

/// `node_credentials_served_total`'s samples, as the metrics endpoint shows them, sorted.
fn node_credentials_samples(api: &Api) -> Vec<String> {
    let mut registry = prometheus_client::registry::Registry::default();
    api.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut samples: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with("node_credentials_served_total"))
        .map(str::to_owned)
        .collect();
    samples.sort();
    samples
}

#[tokio::test]
async fn a_granted_pod_gets_the_nodes_iam_answers_as_the_node_gives_them_and_each_document_is_counted() {
    let service_account = node_credentials::ServiceAccountRef::parse("kube-system/ebs-csi-node").unwrap();
    let api = Api::with_node_credentials(NodeCredentials::new(
        node_credentials::HostNetworkCredentials::Node,
        vec![service_account],
    ));
    for caller in [DAEMON, CSI] {
        assert_eq!(api.get(caller, CREDS).await.body, "node-role");
        let document = api.get(caller, &format!("{CREDS}node-role")).await;
        assert_eq!(
            (document.status, document.body.as_str()),
            (StatusCode::OK, NODE_CREDENTIALS)
        );
        assert_eq!(
            api.get(caller, &format!("{CREDS}app")).await.status,
            StatusCode::NOT_FOUND,
            "the node's answer for a role it does not have"
        );
        let extended = api
            .get(
                caller,
                "/latest/meta-data/iam/security-credentials-extended/node-role",
            )
            .await;
        assert_eq!(extended.status, StatusCode::NOT_FOUND, "as the node has it");
        assert!(
            api.get(caller, "/latest/meta-data/iam/info")
                .await
                .body
                .contains("node-profile")
        );
        assert_eq!(
            api.get(caller, "/latest/meta-data/iam/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        api.get(DAEMON, "/2021-03-23/meta-data/iam/security-credentials/node-role")
            .await
            .body,
        NODE_CREDENTIALS,
        "a dated version is passed on as asked"
    );
    assert_eq!(iam_paths_asked(&api).len(), 13, "{:?}", iam_paths_asked(&api));
    assert_eq!(
        node_credentials_samples(&api),
        [
            r#"node_credentials_served_total{grant="host_network"} 2"#,
            r#"node_credentials_served_total{grant="service_account"} 1"#
        ]
    );
    let served: Vec<_> = api
        .node_credentials
        .pods_served()
        .into_iter()
        .map(|served| (served.pod.name, served.grant, served.answers))
        .collect();
    assert_eq!(
        served,
        [
            ("aws-node-x".to_owned(), Grant::HostNetwork, 2),
            ("ebs-csi-node-x".to_owned(), Grant::ServiceAccount, 1)
        ]
    );
    let newest = &api.recent.newest_first()[0];
    assert_eq!(
        (newest.node_credentials, newest.role.as_deref(), newest.status),
        (Some(Grant::HostNetwork), None, 200)
    );
}

#[tokio::test]
async fn a_pod_that_names_a_role_or_is_not_granted_never_reaches_the_nodes_credentials() {
    let api = Api::new(false);
    assert_eq!(api.get(HOST_APP, CREDS).await.body, "app");
    let own = api.get(HOST_APP, &format!("{CREDS}app")).await;
    assert!(own.body.contains("ASIA-app"), "{}", own.body);
    assert_eq!(
        api.get(HOST_APP, &format!("{CREDS}node-role")).await.status,
        StatusCode::NOT_FOUND
    );
    for path in [CREDS.to_owned(), format!("{CREDS}node-role")] {
        let reply = api.get(CSI, &path).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "not granted: no role, no default"
        );
    }
    assert!(iam_paths_asked(&api).is_empty(), "{:?}", iam_paths_asked(&api));
    assert!(node_credentials_samples(&api).is_empty());
    assert!(api.node_credentials.pods_served().is_empty());
}

#[tokio::test]
async fn host_network_pods_get_nothing_under_none_and_the_default_role_under_default_role() {
    let none = Api::with_node_credentials(NodeCredentials::new(
        node_credentials::HostNetworkCredentials::None,
        Vec::new(),
    ));
    for path in [
        CREDS.to_owned(),
        format!("{CREDS}node-role"),
        "/latest/meta-data/iam/info".to_owned(),
    ] {
        assert_eq!(
            none.get(DAEMON, &path).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        none.recent.newest_first()[0]
            .refusal
            .as_ref()
            .map(|(reason, _)| *reason),
        Some("no_role")
    );
    assert_eq!(
        none.get(DAEMON, "/latest/meta-data/instance-id").await.status,
        StatusCode::OK,
        "the paths that hold no secret are still proxied"
    );
    assert_eq!(none.get(HOST_APP, CREDS).await.body, "app");
    assert!(iam_paths_asked(&none).is_empty());

    let default_role = Api::with_node_credentials(NodeCredentials::new(
        node_credentials::HostNetworkCredentials::DefaultRole,
        Vec::new(),
    ));
    assert_eq!(
        default_role.get(DAEMON, CREDS).await.status,
        StatusCode::NOT_FOUND,
        "no default role here: nothing"
    );
    assert!(iam_paths_asked(&default_role).is_empty());
}

#[tokio::test]
async fn the_nodes_secrets_are_refused_to_granted_pods_too() {
    let api = Api::new(false);
    for path in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/signature",
        "/latest/dynamic/instance-identity/rsa2048",
    ] {
        let reply = api.get(DAEMON, path).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            api.recent.newest_first()[0]
                .refusal
                .as_ref()
                .map(|(reason, _)| *reason),
            Some("node_secret")
        );
    }
    assert!(api.node.asked.lock().unwrap().is_empty());
}
