//! agent: the `interceptor agent` command. Its flags (each also an `INTERCEPTOR_*` variable), and the
//! start-up order that keeps a pod from ever reaching the node's credentials or anyone else's port in
//! the agent's place: refuse first (exempt the agent's own cgroup, guard its ports, attach refusing
//! programs unless some are pinned: [`guard`]), hold the ports (health server, metadata socket), load
//! the configuration, listen, switch the programs to redirect, then serve and report ready.
//! `interceptor uninstall` removes what the agent pinned.

use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    num::{NonZeroU32, NonZeroUsize},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use clap::builder::TypedValueParser;
use interceptor_common::CgroupId;
use tokio::net::TcpSocket;

pub mod guard;
mod kube2iam;
mod node_taint;
mod status;

pub use self::kube2iam::Kube2iamArgs;
use crate::{
    bpf::{Interceptor, Mode, RedirectConfig, metrics::BpfCollector},
    creds::{CredentialCache, REFRESH_CHECK, StsAssumeRole},
    identity::{self, CgroupPaths},
    imds::{
        self, ConnectionBounds, ImdsMetrics, ImdsState,
        limits::{ConnectionLimits, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_POD, LimitKeys},
        node_credentials::{HostNetworkCredentials, NodeCredentials, ServiceAccountRef},
        rate::{DEFAULT_BURST, DEFAULT_REQUESTS_PER_SECOND, RequestQuota, RequestRates},
        recent::RecentRequests,
        route::{AllowList, DEFAULT_ALLOWED, REFUSED},
        token::TokenKey,
        upstream::{MetadataService, Upstream},
    },
    policy::{BaseArn, PatternFormat, Policy, tags::SessionTagging},
    status::socket::DEFAULT_STATUS_SOCKET,
    telemetry::{self, LogFormat, Telemetry},
    workload::{
        FirstMatch, StaticWorkloads, WorkloadSource,
        kube::{KubeSettings, KubeWorkloads},
    },
};

/// A flag given twice takes its last value, so wrappers can append overrides to a base command line.
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct AgentArgs {
    /// cgroup v2 directory whose subtree is intercepted [default: the kubelet's kubepods cgroup under the
    /// cgroup2 mount]
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where the programs' links and shared maps are pinned, so they stay attached while
    /// the agent restarts (`interceptor uninstall` removes them).
    #[arg(long, env = "INTERCEPTOR_BPFFS_DIR", value_name = "PATH", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Redirect target and listen address [default: $HOST_IP:8181]
    #[arg(long, env = "INTERCEPTOR_AGENT_ADDR", value_name = "IP:PORT")]
    pub agent_addr: Option<SocketAddr>,
    /// The node's real metadata service: http://HOST[:PORT], or HOST[:PORT] as kube2iam's flag takes
    /// it.
    #[arg(
        long,
        env = "INTERCEPTOR_METADATA_ADDR",
        value_name = "URL",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_addr: String,
    /// STS endpoint override (default: the regional endpoint).
    #[arg(long, env = "INTERCEPTOR_STS_ENDPOINT", value_name = "URL")]
    pub sts_endpoint: Option<String>,
    /// AWS region for STS (default: the SDK's region chain: AWS_REGION, profile, instance metadata).
    #[arg(long, env = "INTERCEPTOR_REGION")]
    pub region: Option<String>,
    /// Static workload file (TOML `[[workload]]` entries), matched before Kubernetes pods when both are
    /// on.
    #[arg(long, env = "INTERCEPTOR_WORKLOADS", value_name = "FILE")]
    pub workloads: Option<PathBuf>,
    /// Serve the node's pods from the Kubernetes API [default: true without --workloads, false with it]
    #[arg(long, env = "INTERCEPTOR_KUBERNETES", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub kubernetes: Option<bool>,
    /// This node's name: only pods with this spec.nodeName are served [default: $NODE_NAME]
    #[arg(long, env = "INTERCEPTOR_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Once ready, remove every taint with this key from the Node --node names, so pods are scheduled
    /// to the node only once their metadata calls are served (the node registers with it). Needs the
    /// Kubernetes source.
    #[arg(long, env = "INTERCEPTOR_REMOVE_NODE_TAINT", value_name = "KEY")]
    pub remove_node_taint: Option<String>,
    /// kubeconfig file for the API server [default: in-cluster config; $KUBECONFIG when set]
    #[arg(
        long,
        env = "INTERCEPTOR_KUBECONFIG",
        value_name = "FILE",
        conflicts_with = "api_server"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, instead of the in-cluster config or a kubeconfig.
    #[arg(long, env = "INTERCEPTOR_API_SERVER", value_name = "URL")]
    pub api_server: Option<String>,
    /// Bearer token for the API server.
    #[arg(
        long,
        env = "INTERCEPTOR_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    /// Do not verify the API server's certificate.
    #[arg(long, env = "INTERCEPTOR_INSECURE", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
    /// Pod (and ServiceAccount) annotation naming the role.
    #[arg(
        long,
        env = "INTERCEPTOR_IAM_ROLE_KEY",
        value_name = "KEY",
        default_value = "iam.amazonaws.com/role"
    )]
    pub iam_role_key: String,
    /// Pod (and ServiceAccount) annotation naming the external id (kube2iam's --iam-external-id is this key).
    #[arg(
        long = "iam-external-id",
        alias = "iam-external-id-key",
        env = "INTERCEPTOR_IAM_EXTERNAL_ID_KEY",
        value_name = "KEY",
        default_value = "iam.amazonaws.com/external-id"
    )]
    pub iam_external_id_key: String,
    /// A pod without a role annotation takes its ServiceAccount's role annotation (same key).
    #[arg(long, env = "INTERCEPTOR_SERVICEACCOUNT_ROLES", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub serviceaccount_roles: bool,
    /// A pod may only take roles its namespace's annotation (--namespace-key) allows; the default role
    /// is not checked.
    #[arg(long, env = "INTERCEPTOR_NAMESPACE_RESTRICTIONS", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub namespace_restrictions: bool,
    /// Namespace annotation of the allowed roles: a JSON array of patterns, or one bare pattern.
    #[arg(
        long,
        env = "INTERCEPTOR_NAMESPACE_KEY",
        value_name = "KEY",
        default_value = "iam.amazonaws.com/allowed-roles"
    )]
    pub namespace_key: String,
    /// How the namespace's patterns are written (regexps are anchored).
    #[arg(long, env = "INTERCEPTOR_NAMESPACE_RESTRICTION_FORMAT", value_enum, default_value_t = PatternFormat::Glob)]
    pub namespace_restriction_format: PatternFormat,
    /// How long a request from a pod the API server has not delivered yet waits for it before 503.
    #[arg(long, env = "INTERCEPTOR_POD_WAIT", value_name = "DURATION", default_value = "500ms",
          value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,
    /// Every AssumeRole for a pod carries session tags of its namespace, ServiceAccount, name and uid,
    /// under the keys the EKS Pod Identity agent uses (kubernetes-namespace, ...), for attribute-based
    /// IAM policies. Each role's trust policy must allow sts:TagSession.
    #[arg(long, env = "INTERCEPTOR_SESSION_TAGS", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub session_tags: bool,
    /// With --session-tags, also tag each session kubernetes-cluster-name and eks-cluster-name with
    /// this name.
    #[arg(long, env = "INTERCEPTOR_CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// With --session-tags, mark every tag transitive: it stays on the sessions a pod's session assumes
    /// in turn (role chaining).
    #[arg(long, env = "INTERCEPTOR_SESSION_TAGS_TRANSITIVE", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub session_tags_transitive: bool,
    /// ARN prefix role names are joined to, e.g. arn:aws:iam::123456789012:role/
    #[arg(long, env = "INTERCEPTOR_BASE_ROLE_ARN", value_name = "ARN")]
    pub base_role_arn: Option<String>,
    /// Take the base role ARN from the node's instance profile (metadata iam/info). Not with
    /// --base-role-arn.
    #[arg(long, env = "INTERCEPTOR_AUTO_DISCOVER_BASE_ARN",
          num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_discover_base_arn: bool,
    /// Role (name or ARN) for workloads that name none; without it they get no credentials.
    #[arg(long, env = "INTERCEPTOR_DEFAULT_ROLE", value_name = "ROLE")]
    pub default_role: Option<String>,
    /// Use the node's instance role as the default role (assumed through STS like any other role),
    /// and, as kube2iam does, its instance profile's base ARN unless --base-role-arn names one. Not
    /// with --default-role.
    #[arg(long, env = "INTERCEPTOR_AUTO_DISCOVER_DEFAULT_ROLE",
          num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_discover_default_role: bool,
    /// Lifetime of assumed-role sessions (15m to 12h).
    #[arg(long, env = "INTERCEPTOR_IAM_ROLE_SESSION_TTL", value_name = "DURATION", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub iam_role_session_ttl: Duration,
    /// How long a failed AssumeRole is remembered per role session: requests get its error (503) without
    /// a new STS call until then. 0 remembers nothing.
    #[arg(long, env = "INTERCEPTOR_IAM_ROLE_ERROR_TTL", value_name = "DURATION", default_value = "0s",
          value_parser = humantime::parse_duration)]
    pub iam_role_error_ttl: Duration,
    /// Bound on one STS AssumeRole call: a caller with no usable set gets 503 with Retry-After after it.
    #[arg(long, env = "INTERCEPTOR_STS_TIMEOUT", value_name = "DURATION", default_value = "2s",
          value_parser = humantime::parse_duration)]
    pub sts_timeout: Duration,
    /// Refuse metadata requests that carry no IMDSv2 token.
    #[arg(long, env = "INTERCEPTOR_REQUIRE_IMDSV2", num_args = 0..=1, value_name = "BOOL", default_missing_value = "true", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub require_imdsv2: bool,
    /// Paths below the version (globs, e.g. `meta-data/**`) passed to the node's metadata service,
    /// added to the default list (every path below meta-data and dynamic) or to
    /// --metadata-proxy-allow-only's. The node's credentials, identity credentials, user-data and signed
    /// identity documents are refused whatever this says.
    #[arg(
        long = "metadata-proxy-allow",
        env = "INTERCEPTOR_METADATA_PROXY_ALLOW",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub metadata_proxy_allow: Vec<String>,
    /// Paths below the version (globs, e.g. `meta-data/placement/**`) passed to the node's metadata
    /// service in place of the default list; empty: none. The node's secrets are refused whatever this
    /// says.
    #[arg(
        long = "metadata-proxy-allow-only",
        env = "INTERCEPTOR_METADATA_PROXY_ALLOW_ONLY",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub metadata_proxy_allow_only: Option<Vec<String>>,
    /// What a hostNetwork pod that names no role (nor its ServiceAccount) gets: the node's own
    /// instance-profile credentials (kube2iam's behaviour: the VPC CNI needs them), the default role
    /// like any other pod, or none (404).
    #[arg(long, env = "INTERCEPTOR_HOST_NETWORK_CREDENTIALS", value_enum,
          default_value_t = HostNetworkCredentials::Node)]
    pub host_network_credentials: HostNetworkCredentials,
    /// Pods running as one of these ServiceAccounts that name no role get the node's own
    /// instance-profile credentials, hostNetwork or not (e.g. kube-system/aws-node).
    #[arg(long, env = "INTERCEPTOR_NODE_CREDENTIALS_FOR", value_name = "NAMESPACE/SERVICEACCOUNT",
          value_delimiter = ',', value_parser = ServiceAccountRef::parse)]
    pub node_credentials_for: Vec<ServiceAccountRef>,
    /// Metadata requests a second one pod may make, sustained (outside pods, one cgroup). A request
    /// over it is held until the pod's budget has room, or answered 429 when that is more than 0.5 s
    /// away.
    #[arg(long, env = "INTERCEPTOR_POD_REQUEST_RATE", value_name = "N",
          default_value_t = DEFAULT_REQUESTS_PER_SECOND, value_parser = count_up_to(MAX_COUNT_FLAG))]
    pub pod_request_rate: NonZeroU32,
    /// Metadata requests one pod may make at once when its budget is whole (after a quiet spell of
    /// burst / rate seconds).
    #[arg(long, env = "INTERCEPTOR_POD_REQUEST_BURST", value_name = "N",
          default_value_t = DEFAULT_BURST, value_parser = count_up_to(MAX_COUNT_FLAG))]
    pub pod_request_burst: NonZeroU32,
    /// Metadata connections the agent keeps open at once; more are closed at accept. Past three
    /// quarters of it, only pods holding fewer than 4 are admitted, so that every pod can open 4
    /// however many the others hold (for up to N / 16 pods: 256 at the default).
    #[arg(long, env = "INTERCEPTOR_MAX_CONNECTIONS", value_name = "N",
          default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = count_up_to(MAX_COUNT_FLAG))]
    pub max_connections: NonZeroU32,
    /// Metadata connections one pod may hold open at once (outside pods, one cgroup); more are closed
    /// at accept, and the kernel refuses the container's connects until half have closed. At most
    /// --max-connections.
    #[arg(long, env = "INTERCEPTOR_MAX_CONNECTIONS_PER_POD", value_name = "N",
          default_value_t = DEFAULT_MAX_CONNECTIONS_PER_POD, value_parser = count_up_to(MAX_COUNT_FLAG))]
    pub max_connections_per_pod: NonZeroU32,
    /// Address of the health server: /metrics, /healthz, /readyz [default: 0.0.0.0:9181]
    #[arg(long, env = "INTERCEPTOR_METRICS_ADDR", value_name = "IP:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket where `interceptor status` asks the agent for its sources, workloads and last
    /// requests; never a TCP port, as pod names and roles are not for the network. Made mode 0600 (its
    /// directory 0700 when the agent creates it), replacing a socket a previous agent left, and removed
    /// on exit. Empty: no socket. One that cannot be made is logged and the agent runs without it.
    #[arg(long, env = "INTERCEPTOR_STATUS_SOCKET", value_name = "PATH", default_value = DEFAULT_STATUS_SOCKET)]
    pub status_socket: OsString,
    /// Threads of the agent's async runtime, which answers metadata requests and does everything else.
    /// One answered ~70k cached-credentials requests/s on 2 cores in `cargo xtask bench`, with a lower
    /// p99 than two (which contend with the node's workloads), far above what pods ask.
    #[arg(long, env = "INTERCEPTOR_WORKER_THREADS", value_name = "N", default_value_t = NonZeroUsize::MIN)]
    pub worker_threads: NonZeroUsize,
    /// Log format.
    #[arg(long, env = "INTERCEPTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level or tracing directives (`info`, `interceptor=debug`).
    #[arg(long, env = "INTERCEPTOR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub kube2iam: Kube2iamArgs,
}

impl AgentArgs {
    /// The log filter: --log-level, with kube2iam's level names (`warning`, `fatal`, `panic`) read as
    /// tracing's, and debug when kube2iam's --verbose or --debug is given.
    pub fn log_filter(&self) -> String {
        if self.kube2iam.wants_debug() {
            return "debug".to_owned();
        }
        match self.log_level.as_str() {
            "warning" => "warn".to_owned(),
            "fatal" | "panic" => "error".to_owned(),
            other => other.to_owned(),
        }
    }
}

/// A whole number from 1 to `max`; clap's error names the flag and the range when it is not.
fn count_up_to(max: u32) -> impl TypedValueParser<Value = NonZeroU32> {
    clap::value_parser!(u32)
        .range(1..=i64::from(max))
        .try_map(NonZeroU32::try_from)
}

/// Bound on the limit flags: a million requests a second, or open connections, is past anything one
/// node's agent serves (it answers tens of thousands a second), so a larger number is a typo.
const MAX_COUNT_FLAG: u32 = 1_000_000;
/// Bound on the time a pod's whole burst takes to refill: the agent remembers a pod's budget until
/// it is whole again, so this bounds how long a pod that is gone is remembered.
const MAX_BURST_REFILL: Duration = Duration::from_secs(600);
const DEFAULT_AGENT_PORT: u16 = 8181;
const DEFAULT_METRICS_PORT: u16 = 9181;
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/interceptor";
/// Cgroup ids whose paths, and whose limit keys, are remembered (one per container that asked
/// recently).
const CGROUP_PATH_CACHE: NonZeroUsize = NonZeroUsize::new(16_384).expect("non-zero");
/// Sessions the credential cache holds at most.
const MAX_SESSIONS: usize = 10_000;
const WORKLOAD_FILE_CHECK: Duration = Duration::from_secs(1);
/// The SDKs give up on the metadata service after 1 to 5 seconds; a longer wait only hides a problem.
const MAX_POD_WAIT: Duration = Duration::from_secs(5);
const NODE_CREDENTIALS_CHECK: Duration = Duration::from_secs(30);
/// Connections waiting to be accepted: what tokio's `TcpListener::bind` uses.
const LISTEN_BACKLOG: u32 = 1024;

/// The metadata API's socket, bound (so no one else holds the port) but not yet listening.
fn bind_metadata_socket(addr: SocketAddrV4) -> Result<TcpSocket> {
    let socket = TcpSocket::new_v4().context("cannot make the metadata API's socket")?;
    socket
        .set_reuseaddr(true)
        .context("cannot make the metadata API's socket")?;
    socket
        .bind(SocketAddr::V4(addr))
        .with_context(|| format!("cannot bind {addr}"))?;
    Ok(socket)
}

/// The agent's ports, which no workload may bind in the node's network namespace.
fn guarded_ports(agent_addr: SocketAddrV4, metrics_addr: Option<SocketAddr>) -> Vec<u16> {
    std::iter::once(agent_addr.port())
        .chain(metrics_addr.map(|addr| addr.port()))
        .collect()
}

/// The agent's ports as its flags give them, for the programs that refuse when the agent cannot tell
/// its address.
fn guarded_ports_of_flags(args: &AgentArgs) -> Vec<u16> {
    vec![agent_port(args), metrics_port(args)]
}

/// The metadata port: --agent-addr's, else --app-port, else 8181.
fn agent_port(args: &AgentArgs) -> u16 {
    args.agent_addr
        .map(|addr| addr.port())
        .or(args.kube2iam.app_port)
        .unwrap_or(DEFAULT_AGENT_PORT)
}

/// The health port: --metrics-addr's, else --metrics-port, else 9181.
fn metrics_port(args: &AgentArgs) -> u16 {
    args.metrics_addr
        .map(|addr| addr.port())
        .or(args.kube2iam.metrics_port)
        .unwrap_or(DEFAULT_METRICS_PORT)
}

/// Warns of a guarded port among the kernel's ephemeral ports: a workload's connect or listen on an
/// unbound socket takes one of those without a bind, which the guard sees.
fn warn_of_ephemeral_ports(ports: &[u16]) {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let bounds: Vec<u16> = range.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    if let [low, high] = bounds[..] {
        for port in ports.iter().filter(|port| (low..=high).contains(port)) {
            tracing::warn!(
                port,
                low,
                high,
                "the agent's port is among the kernel's ephemeral ports (net.ipv4.ip_local_port_range): reserve it with net.ipv4.ip_local_reserved_ports, or a workload could take it without a bind"
            );
        }
    }
}

/// The cookie of the agent's network namespace, the node's; `None` (the initial namespace, the node's
/// on every Kubernetes node) where the kernel cannot tell it.
fn node_netns_cookie() -> Option<u64> {
    match crate::bpf::netns_cookie() {
        Ok(Some(cookie)) => Some(cookie),
        Ok(None) => {
            tracing::info!(
                "this kernel cannot tell a network namespace's cookie (before 5.14): the agent's ports are guarded in the initial network namespace"
            );
            None
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the network namespace's cookie: the agent's ports are guarded in the initial network namespace");
            None
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs) -> Result<()> {
    let started_at = SystemTime::now();
    raise_open_files_limit();
    args.kube2iam.warn_ignored();
    // 0. Refuse first, before any configuration, file wait, API server or STS call: pods' metadata
    //    connects are refused and the agent's ports guarded (programs pinned by `interceptor guard` or
    //    a previous agent are kept), and this agent's own cgroup is exempt from whatever programs run
    //    (a restarted agent container has a new cgroup, whose own metadata calls and binds would
    //    otherwise be taken as a pod's).
    let mount = identity::cgroup2_mount()?;
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => detect_kubepods(&mount)?,
    };
    let cgroups = Arc::new(CgroupPaths::new(mount.clone(), CGROUP_PATH_CACHE)?);
    let own_cgroup = own_cgroup_id(&mount)?;
    let agent_addr = match agent_addr(&args) {
        Ok(addr) => addr,
        // Without its address the agent cannot serve, but it can still refuse for the next one.
        Err(err) => {
            let mut programs = RedirectConfig::guard(cgroup_root, guarded_ports_of_flags(&args));
            programs.pin_dir = Some(args.bpffs_dir.clone());
            return Err(match guard::hold(&programs, &cgroups) {
                Ok(_) => err.context("pods' metadata connects are refused until an agent serves"),
                Err(hold_err) => err.context(format!(
                    "and metadata connects could not be refused ({hold_err:#})"
                )),
            });
        }
    };
    let metrics_addr = metrics_addr(&args, agent_addr);
    let mut programs = RedirectConfig::new(cgroup_root.clone(), agent_addr);
    programs.exempt_cgroups = vec![own_cgroup];
    programs.guarded_ports = guarded_ports(agent_addr, metrics_addr);
    programs.node_netns_cookie = node_netns_cookie();
    programs.pin_dir = Some(args.bpffs_dir.clone());
    warn_of_ephemeral_ports(&programs.guarded_ports);
    let held = guard::hold(&programs, &cgroups)?;

    // 1. Hold the ports before any redirect points at them: the health server (so a probe sees
    //    "alive, not ready" for the rest of the start-up) and the metadata API's socket, bound now and
    //    listening just before the redirect.
    let telemetry = Arc::new(Telemetry::default());
    let health_on_agent_port = match metrics_addr {
        Some(metrics_addr) => {
            telemetry::spawn_server(metrics_addr, telemetry.clone()).await?;
            false
        }
        None => true,
    };
    let socket = match bind_metadata_socket(agent_addr) {
        Ok(socket) => socket,
        Err(err) => return Err(guard::refuse_after(&programs, held.as_ref(), err)),
    };

    // 2. Configuration: everything that can be wrong is found before anything is attached.
    let ttl = args.iam_role_session_ttl;
    ensure!(
        (Duration::from_secs(15 * 60)..=Duration::from_secs(12 * 3600)).contains(&ttl),
        "--iam-role-session-ttl must be between 15m and 12h (STS's limits), not {}",
        humantime::format_duration(ttl)
    );
    ensure!(
        !args.sts_timeout.is_zero(),
        "--sts-timeout must be more than zero"
    );
    let limits = connection_limits(&args)?;
    let quota = request_quota(&args)?;
    let allow = allow_list(&args)?;
    let node_credentials = Arc::new(node_credentials(&args));
    let upstream = Arc::new(MetadataService::new(&args.metadata_addr).context("bad --metadata-addr")?);
    let policy = policy(&args, upstream.as_ref()).await?;
    let sources = workload_sources(&args, &policy, &telemetry).await?;
    let limit_keys = LimitKeys::new(cgroups.clone(), CGROUP_PATH_CACHE);
    let sts = Arc::new(StsAssumeRole::from_env(args.region.clone(), args.sts_endpoint.clone()).await);
    let _node_credentials_check = watch_node_credentials(&sts, &telemetry).await;
    let creds = Arc::new(
        CredentialCache::new(sts, ttl, MAX_SESSIONS)
            .with_sts_timeout(args.sts_timeout)
            .with_error_ttl(args.iam_role_error_ttl),
    );
    telemetry.register(|registry| creds.metrics().register(registry));

    // 3. Listen, then redirect: from here on, every new connection to the metadata address comes to
    //    the agent, and waits in the listen queue until it is served.
    let listener = match socket.listen(LISTEN_BACKLOG) {
        Ok(listener) => listener,
        Err(err) => {
            let err = anyhow::Error::new(err).context(format!("cannot listen on {agent_addr}"));
            return Err(guard::refuse_after(&programs, held.as_ref(), err));
        }
    };
    // The agent's own refusing programs switch with one write; a previous agent's are replaced.
    programs.mode = Mode::Redirect;
    let interceptor = match held {
        Some(held) => match held.set_mode(Mode::Redirect) {
            Ok(()) => held,
            Err(err) => return Err(guard::refuse_after(&programs, Some(&held), err.into())),
        },
        None => match Interceptor::attach(&programs) {
            Ok(attached) => attached,
            Err(err) => return Err(guard::refuse_after(&programs, None, err.into())),
        },
    };
    let interceptor = Arc::new(interceptor);
    let collector = BpfCollector::new(interceptor.clone());
    telemetry.register(|registry| registry.register_collector(Box::new(collector)));
    telemetry.readiness.set_attached(true);

    // 4. Serve.
    let _workload_watch = sources.file.as_ref().map(|file| file.watch(WORKLOAD_FILE_CHECK));
    let _refresher = creds.spawn_refresher(REFRESH_CHECK);
    let metrics = ImdsMetrics::default();
    telemetry.register(|registry| metrics.register(registry));
    let recent = Arc::new(RecentRequests::default());
    let rates = Arc::new(RequestRates::new(quota, metrics.clone()));
    let _forgetting = rates.spawn_forgetting();
    let _status_socket = status::serve(
        Path::new(&args.status_socket),
        status::AgentView {
            started_at,
            agent_addr,
            cgroup_root: cgroup_root.clone(),
            bpffs_dir: args.bpffs_dir.clone(),
            telemetry: telemetry.clone(),
            sources: sources.clone(),
            policy: policy.clone(),
            node_credentials: node_credentials.clone(),
            recent: recent.clone(),
        },
    );
    let state = ImdsState {
        cgroups,
        workloads: sources.combined(),
        policy,
        creds,
        upstream,
        allow,
        node_credentials,
        tokens: TokenKey::random(),
        require_v2: args.require_imdsv2,
        metrics: metrics.clone(),
        node_health: health_on_agent_port.then(|| telemetry::router(telemetry.clone())),
        recent,
        rates,
    };

    // 5. Ready once the workload sources have synced; pods that ask before then wait for their pod.
    let _ready = tokio::spawn({
        let telemetry = telemetry.clone();
        let pods = sources.pods.clone();
        let file = args.workloads.clone();
        let taint_key = args.remove_node_taint.clone();
        async move {
            if let Some(pods) = &pods {
                pods.synced().await;
            }
            telemetry.readiness.set_workloads_synced(true);
            tracing::info!(agent_addr = %agent_addr, metrics_addr = ?metrics_addr, cgroup_root = %cgroup_root.display(),
                exempt_cgroup_id = own_cgroup.0, workloads = ?file, kubernetes = pods.is_some(), "ready");
            // Only now may pods come: the taint that kept them off the node goes.
            if let (Some(key), Some(pods)) = (taint_key, &pods) {
                node_taint::remove(pods.client(), pods.node(), &key).await;
            }
        }
    });
    let router = imds::router(Arc::new(state));
    tracing::info!(
        max_connections = args.max_connections,
        max_connections_per_pod = args.max_connections_per_pod,
        pod_request_rate = args.pod_request_rate,
        pod_request_burst = args.pod_request_burst,
        "limits per pod"
    );
    let bounds = ConnectionBounds {
        keys: limit_keys,
        limits: Arc::new(limits.with_gate(interceptor.clone())),
    };
    let programs_refuse = interceptor.clone();
    let shutdown = async move {
        shutdown_signal().await;
        // New metadata connections are refused in the kernel from here on, so none waits in a listen
        // queue that is about to close; those already made are answered before the agent exits.
        if let Err(err) = programs_refuse.set_mode(Mode::Refuse) {
            tracing::warn!(error = %err, "cannot switch the programs to refusing; connections made while the agent stops are reset");
        }
        tracing::info!("stopping: metadata connects refused, draining those made");
    };
    imds::serve(listener, router, interceptor, bounds, metrics, shutdown).await;
    // The pinned programs stay, refusing: until the next agent takes over, pods' metadata connections
    // fail at once.
    telemetry.readiness.set_attached(false);
    tracing::info!(bpffs_dir = %args.bpffs_dir.display(), "shutting down; programs stay attached (interceptor uninstall removes them)");
    Ok(())
}

/// The paths proxied to the node's metadata service: --metadata-proxy-allow-only's, else the default
/// list, and --metadata-proxy-allow's.
fn allow_list(args: &AgentArgs) -> Result<AllowList> {
    let base: Vec<&str> = match &args.metadata_proxy_allow_only {
        Some(only) => only.iter().map(String::as_str).collect(),
        None => DEFAULT_ALLOWED.to_vec(),
    };
    let patterns: Vec<&str> = base
        .into_iter()
        .chain(args.metadata_proxy_allow.iter().map(String::as_str))
        .filter(|pattern| !pattern.is_empty())
        .collect();
    let allow = AllowList::new(&patterns)
        .context("bad --metadata-proxy-allow or --metadata-proxy-allow-only glob")?;
    tracing::info!(paths = ?patterns, refused = ?REFUSED, "metadata paths proxied to the node's metadata service");
    Ok(allow)
}

/// The node-credentials setting: --host-network-credentials and --node-credentials-for.
fn node_credentials(args: &AgentArgs) -> NodeCredentials {
    let service_accounts: Vec<String> = args
        .node_credentials_for
        .iter()
        .map(ToString::to_string)
        .collect();
    let host_network = clap::ValueEnum::to_possible_value(&args.host_network_credentials)
        .map(|value| value.get_name().to_owned());
    tracing::info!(host_network_credentials = host_network.as_deref(), node_credentials_for = ?service_accounts,
        "which pods that name no role get the node's own credentials");
    NodeCredentials::new(args.host_network_credentials, args.node_credentials_for.clone())
}

/// --max-connections and --max-connections-per-pod, the second no more than the first.
fn connection_limits(args: &AgentArgs) -> Result<ConnectionLimits> {
    ensure!(
        args.max_connections_per_pod <= args.max_connections,
        "--max-connections-per-pod ({}) must be at most --max-connections ({})",
        args.max_connections_per_pod,
        args.max_connections
    );
    Ok(ConnectionLimits::new(
        args.max_connections,
        args.max_connections_per_pod,
    ))
}

/// --pod-request-rate and --pod-request-burst, the burst refilled within [`MAX_BURST_REFILL`].
fn request_quota(args: &AgentArgs) -> Result<RequestQuota> {
    let (per_second, burst) = (args.pod_request_rate, args.pod_request_burst);
    let refill = Duration::from_secs(1) / per_second.get() * burst.get();
    ensure!(
        refill <= MAX_BURST_REFILL,
        "--pod-request-burst ({burst}) takes {} to refill at --pod-request-rate ({per_second}): at most {}",
        humantime::format_duration(refill),
        humantime::format_duration(MAX_BURST_REFILL)
    );
    Ok(RequestQuota { per_second, burst })
}

/// The workload sources the flags turn on: the static file, the node's pods, or both.
#[derive(Clone)]
struct Sources {
    file: Option<Arc<StaticWorkloads>>,
    pods: Option<Arc<KubeWorkloads>>,
}

impl Sources {
    /// One source for the API: the static file's entries match first.
    fn combined(&self) -> Arc<dyn WorkloadSource> {
        let file = self.file.clone().map(|file| file as Arc<dyn WorkloadSource>);
        let pods = self.pods.clone().map(|pods| pods as Arc<dyn WorkloadSource>);
        match (file, pods) {
            (Some(file), Some(pods)) => Arc::new(FirstMatch(vec![file, pods])),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => unreachable!("workload_sources turns one on"),
        }
    }
}

async fn workload_sources(args: &AgentArgs, policy: &Policy, telemetry: &Telemetry) -> Result<Sources> {
    let kubernetes = args.kubernetes.unwrap_or(args.workloads.is_none());
    ensure!(
        kubernetes || args.workloads.is_some(),
        "no workload source: pass --workloads FILE, or leave --kubernetes on"
    );
    if let Some(key) = &args.remove_node_taint {
        ensure!(
            kubernetes,
            "--remove-node-taint needs the Kubernetes source (the taint is on the Node --node names): leave --kubernetes on"
        );
        ensure!(
            !key.is_empty(),
            "--remove-node-taint is empty: name the taint's key"
        );
    }
    let session_tagging = session_tagging(args, kubernetes)?;
    let file = match &args.workloads {
        Some(path) => {
            wait_for_file(path).await;
            let file = Arc::new(StaticWorkloads::load(path)?);
            telemetry.register(|registry| file.metrics().register(registry));
            Some(file)
        }
        None => None,
    };
    let pods = match kubernetes {
        true => {
            let client = kube_client(args).await?;
            let pods = KubeWorkloads::start(client, kube_settings(args, policy, session_tagging)?);
            telemetry.register(|registry| pods.metrics().register(registry));
            Some(pods)
        }
        false => None,
    };
    Ok(Sources { file, pods })
}

/// How pods' sessions are tagged (--session-tags and the flags that refine it), checked before
/// anything waits: a cluster name STS would refuse stops the agent here rather than refusing every pod.
fn session_tagging(args: &AgentArgs, kubernetes: bool) -> Result<Option<SessionTagging>> {
    if !args.session_tags {
        ensure!(
            args.cluster_name.is_none() && !args.session_tags_transitive,
            "--cluster-name and --session-tags-transitive refine --session-tags: pass it too"
        );
        return Ok(None);
    }
    ensure!(
        kubernetes,
        "--session-tags tags the sessions of Kubernetes pods: leave --kubernetes on (a workload file's entries name their own tags)"
    );
    let tagging = SessionTagging::new(args.cluster_name.clone(), args.session_tags_transitive)
        .context("--cluster-name cannot be sent as a session tag")?;
    tracing::info!(
        cluster_name = tagging.cluster_name,
        transitive = tagging.transitive,
        "pods' sessions carry session tags"
    );
    Ok(Some(tagging))
}

fn kube_settings(
    args: &AgentArgs,
    policy: &Policy,
    session_tags: Option<SessionTagging>,
) -> Result<KubeSettings> {
    let node = match &args.node {
        Some(node) => node.clone(),
        None => std::env::var("NODE_NAME")
            .context("pass --node or set NODE_NAME (the DaemonSet sets it from spec.nodeName)")?,
    };
    ensure!(!node.is_empty(), "--node (or NODE_NAME) is empty");
    ensure!(
        !args.pod_wait.is_zero() && args.pod_wait <= MAX_POD_WAIT,
        "--pod-wait must be more than zero and at most {}",
        humantime::format_duration(MAX_POD_WAIT)
    );
    tracing::info!(node, pod_wait = ?args.pod_wait, serviceaccount_roles = args.serviceaccount_roles,
        namespace_restrictions = args.namespace_restrictions, "serving the node's pods from Kubernetes");
    Ok(KubeSettings {
        node,
        role_key: args.iam_role_key.as_str().into(),
        external_id_key: args.iam_external_id_key.as_str().into(),
        serviceaccount_roles: args.serviceaccount_roles,
        namespace_restrictions: args.namespace_restrictions.then(|| {
            (
                args.namespace_key.as_str().into(),
                args.namespace_restriction_format,
            )
        }),
        pod_wait: args.pod_wait,
        base_arn: policy.base_arn.clone(),
        session_tags,
    })
}

/// A client for the API server: --api-server (with --api-token), else --kubeconfig, else the
/// environment's (in a pod, its ServiceAccount; elsewhere $KUBECONFIG or ~/.kube/config).
async fn kube_client(args: &AgentArgs) -> Result<kube::Client> {
    let mut config = if let Some(server) = &args.api_server {
        kube::Config::new(
            server
                .parse()
                .with_context(|| format!("--api-server {server:?} is not a URL"))?,
        )
    } else if let Some(path) = &args.kubeconfig {
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read --kubeconfig {}", path.display()))?;
        kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .with_context(|| format!("--kubeconfig {} is not usable", path.display()))?
    } else {
        kube::Config::infer()
            .await
            .context("no Kubernetes API configuration: run in a pod with a ServiceAccount, or pass --kubeconfig or --api-server")?
    };
    if let Some(token) = &args.api_token {
        config.auth_info.token = Some(token.clone().into());
    }
    if args.insecure {
        config.accept_invalid_certs = true;
    }
    tracing::info!(api_server = %config.cluster_url, "Kubernetes API");
    kube::Client::try_from(config).context("cannot build the Kubernetes client")
}

/// Raises the soft limit on open files to the hard limit: the connection limits, not the default soft
/// limit of 1024, should decide when the agent stops accepting.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass, which outlives both calls.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "raised the open files limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open files limit");
    }
}

/// A workload file mounted from a ConfigMap may appear after the agent starts: wait for it, not ready.
async fn wait_for_file(path: &Path) {
    let mut logged = false;
    while !path.exists() {
        if !logged {
            tracing::warn!(path = %path.display(), "waiting for the workload file to appear");
            logged = true;
        }
        tokio::time::sleep(WORKLOAD_FILE_CHECK).await;
    }
}

/// Checks now and then that the agent has credentials of its own to call STS with; readiness follows.
async fn watch_node_credentials(
    sts: &Arc<StsAssumeRole>,
    telemetry: &Arc<Telemetry>,
) -> tokio::task::JoinHandle<()> {
    let check = |sts: Arc<StsAssumeRole>, telemetry: Arc<Telemetry>| async move {
        let result = sts.node_credentials().await;
        if let Err(err) = &result {
            tracing::warn!(error = %err, "the agent has no credentials of its own to call STS with");
        }
        telemetry.readiness.set_node_credentials(result.is_ok());
    };
    check(sts.clone(), telemetry.clone()).await;
    let telemetry = telemetry.clone();
    crate::periodic::every(NODE_CREDENTIALS_CHECK, sts, move |sts| {
        check(sts, telemetry.clone())
    })
}

/// The role policy the flags ask for. As in kube2iam, `--auto-discover-default-role` also discovers the
/// base ARN (role names in annotations are joined to it) unless `--base-role-arn` names one; the
/// discovered default role is the instance's own role by its full ARN, whatever base ARN names are
/// joined to. A discovery flag given `=false` is no flag at all, so only one given true conflicts.
async fn policy(args: &AgentArgs, upstream: &dyn Upstream) -> Result<Policy> {
    ensure!(
        !(args.auto_discover_base_arn && args.base_role_arn.is_some()),
        "--auto-discover-base-arn and --base-role-arn both name the base ARN: pass one"
    );
    ensure!(
        !(args.auto_discover_default_role && args.default_role.is_some()),
        "--auto-discover-default-role and --default-role both name the default role: pass one"
    );
    let instance_base = match args.auto_discover_base_arn || args.auto_discover_default_role {
        true => Some(
            discover_base_arn(upstream)
                .await
                .context("cannot discover the base ARN from the node's instance profile")?,
        ),
        false => None,
    };
    let base_arn = match &args.base_role_arn {
        Some(arn) => Some(BaseArn::parse(arn)?),
        None => instance_base.clone(),
    };
    let default_role = match (&args.default_role, &instance_base) {
        (Some(role), _) => Some(role.clone()),
        (None, Some(instance_base)) if args.auto_discover_default_role => {
            let name = discover_instance_role(upstream)
                .await
                .context("cannot discover the node's instance role")?;
            Some(format!("{}{name}", instance_base.as_str()))
        }
        (None, _) => None,
    };
    let policy = Policy {
        base_arn,
        default_role,
    };
    if let Some(role) = &policy.default_role {
        policy.role_arn(role).context("bad default role")?;
    }
    tracing::info!(
        base_arn = policy.base_arn.as_ref().map(BaseArn::as_str),
        default_role = policy.default_role.as_deref(),
        "role policy"
    );
    Ok(policy)
}

async fn metadata_text(upstream: &dyn Upstream, path: &str) -> Result<String> {
    let reply = upstream.get(path).await?;
    ensure!(
        reply.status.is_success(),
        "the metadata service answered {path} with {}",
        reply.status
    );
    String::from_utf8(reply.body.to_vec()).with_context(|| format!("{path} is not text"))
}

async fn discover_base_arn(upstream: &dyn Upstream) -> Result<BaseArn> {
    let info = metadata_text(upstream, "/latest/meta-data/iam/info").await?;
    let info: serde_json::Value = serde_json::from_str(&info).context("iam/info is not JSON")?;
    let profile = info["InstanceProfileArn"]
        .as_str()
        .context("iam/info has no InstanceProfileArn")?;
    Ok(BaseArn::from_instance_profile(profile)?)
}

async fn discover_instance_role(upstream: &dyn Upstream) -> Result<String> {
    let list = metadata_text(upstream, "/latest/meta-data/iam/security-credentials/").await?;
    let role = list.lines().next().unwrap_or_default().trim();
    ensure!(!role.is_empty(), "the node has no instance role");
    Ok(role.to_owned())
}

/// The kubelet's pod cgroups under the cgroup2 mount: the systemd driver's, then the cgroupfs
/// driver's.
pub(crate) const KUBEPODS_CGROUPS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs driver) under the cgroup2 mount. Both
/// there is an error: the programs must attach where the kubelet puts pods, which only the operator
/// knows then (`interceptor guard` run without --cgroup-root on a cgroupfs node makes the other).
pub(crate) fn detect_kubepods(mount: &Path) -> Result<PathBuf> {
    let found: Vec<PathBuf> = KUBEPODS_CGROUPS
        .iter()
        .map(|name| mount.join(name))
        .filter(|dir| dir.is_dir())
        .collect();
    match &found[..] {
        [only] => Ok(only.clone()),
        [] => bail!("no kubepods cgroup under {}: pass --cgroup-root", mount.display()),
        _ => bail!(
            "both {} and {} exist: pass --cgroup-root, the one the kubelet puts pods in",
            found[0].display(),
            found[1].display()
        ),
    }
}

/// The agent's own cgroup, exempt from redirection so the agent reaches the real metadata service.
/// `/proc/self/cgroup` names it relative to the agent's cgroup namespace. In a container with a private
/// one (the default under cgroup v2) that is `/`: the container's own cgroup, which no path under the
/// host's cgroup2 mount names; its id comes from a cgroup2 mount made inside the namespace instead.
fn own_cgroup_id(mount: &Path) -> Result<CgroupId> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("/proc/self/cgroup has no cgroup v2 line")?
        .trim_start_matches('/');
    if relative.is_empty() {
        return identity::cgroup_namespace_root_id()
            .context("cannot find the agent's own cgroup in its cgroup namespace");
    }
    Ok(identity::cgroup_id(&mount.join(relative))?)
}

/// --agent-addr, else the node's IP (--host-ip, else HOST_IP) and --app-port (else 8181).
fn agent_addr(args: &AgentArgs) -> Result<SocketAddrV4> {
    let addr = match (args.agent_addr, args.kube2iam.host_ip) {
        (Some(addr), _) => addr,
        (None, Some(ip)) => SocketAddr::new(ip, agent_port(args)),
        (None, None) => {
            let host_ip =
                std::env::var("HOST_IP").context("pass --agent-addr or --host-ip, or set HOST_IP")?;
            let ip: IpAddr = host_ip
                .parse()
                .with_context(|| format!("HOST_IP {host_ip:?} is not an IP address"))?;
            SocketAddr::new(ip, agent_port(args))
        }
    };
    match addr {
        SocketAddr::V4(v4) if !v4.ip().is_loopback() && !v4.ip().is_unspecified() => Ok(v4),
        // The redirect happens in the caller's network namespace, where loopback is the pod's own.
        SocketAddr::V4(v4) => bail!("--agent-addr {v4}: must be an address of the node that pods can reach"),
        SocketAddr::V6(v6) => {
            bail!("--agent-addr {v6}: an IPv4 address is needed (IPv6 callers reach it too)")
        }
    }
}

/// Where the health server listens: --metrics-addr, else all addresses at --metrics-port (else 9181).
/// `None` when that is the agent's own port (kube2iam's default): the health routes are then answered
/// on the agent's port, to callers outside the pods only.
fn metrics_addr(args: &AgentArgs, agent_addr: SocketAddrV4) -> Option<SocketAddr> {
    let addr = args
        .metrics_addr
        .unwrap_or_else(|| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, metrics_port(args))));
    (addr.port() != agent_addr.port()).then_some(addr)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The agent's bpffs directory.
    #[arg(long, env = "INTERCEPTOR_BPFFS_DIR", value_name = "PATH", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

/// Detaches the programs a stopped agent left pinned and removes its maps: after this, the node's
/// workloads reach the real metadata service again.
pub fn uninstall(args: &UninstallArgs) -> Result<()> {
    let removed = crate::bpf::pin::uninstall(&args.bpffs_dir)?;
    println!(
        "interceptor uninstall: detached {} programs, removed {} maps and {}",
        removed.iter().map(|layout| layout.links).sum::<usize>(),
        removed.iter().map(|layout| layout.maps).sum::<usize>(),
        args.bpffs_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        agent: AgentArgs,
    }

    /// `interceptor agent` with `args`, as clap reads them.
    pub(super) fn parse(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        Command::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map(|command| command.agent)
    }

    #[test]
    fn limit_flags_have_generous_defaults_and_refuse_zero_and_absurd_values() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            (
                args.pod_request_rate.get(),
                args.pod_request_burst.get(),
                args.max_connections.get(),
                args.max_connections_per_pod.get()
            ),
            (100, 1000, 4096, 128)
        );
        let args = parse(&["--pod-request-rate", "5", "--max-connections-per-pod=8"]).unwrap();
        assert_eq!(
            (args.pod_request_rate.get(), args.max_connections_per_pod.get()),
            (5, 8)
        );
        for flag in [
            "--pod-request-rate",
            "--pod-request-burst",
            "--max-connections",
            "--max-connections-per-pod",
        ] {
            for bad in ["0", "1000001", "-1", "lots"] {
                let err = parse(&[&format!("{flag}={bad}")])
                    .map(|_| ())
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(flag) && err.contains(bad), "{flag} {bad}: {err}");
            }
        }
    }

    #[test]
    fn session_tag_flags_are_checked_before_anything_waits() {
        let tagging = |args: &[&str], kubernetes: bool| {
            session_tagging(&parse(args).unwrap(), kubernetes).map_err(|err| format!("{err:#}"))
        };
        assert_eq!(tagging(&[], true), Ok(None));
        assert_eq!(
            tagging(
                &[
                    "--session-tags",
                    "--cluster-name",
                    "prod-eu",
                    "--session-tags-transitive"
                ],
                true
            ),
            Ok(Some(
                SessionTagging::new(Some("prod-eu".to_owned()), true).unwrap()
            ))
        );
        for (args, kubernetes, problem) in [
            (&["--cluster-name", "prod"][..], true, "pass it too"),
            (&["--session-tags-transitive"][..], true, "pass it too"),
            (&["--session-tags"][..], false, "leave --kubernetes on"),
            (
                &["--session-tags", "--cluster-name", "prod;eu"][..],
                true,
                "--cluster-name cannot be sent",
            ),
        ] {
            let err = tagging(args, kubernetes).unwrap_err();
            assert!(err.contains(problem), "{args:?}: {err}");
        }
    }

    /// Whether `args`' allow list proxies `path` (a GET).
    fn proxies(args: &[&str], path: &str) -> bool {
        let allow = allow_list(&parse(args).unwrap()).unwrap();
        crate::imds::route::route(&axum::http::Method::GET, path, &allow).is_ok()
    }

    #[test]
    fn metadata_proxy_allow_adds_to_the_defaults_and_allow_only_replaces_them() {
        let spot = "/latest/meta-data/spot/instance-action";
        let root = "/latest/";
        let region = "/latest/meta-data/placement/region";
        assert!(proxies(&[], spot) && !proxies(&[], root));
        assert!(proxies(&["--metadata-proxy-allow", ""], spot));
        assert!(proxies(&["--metadata-proxy-allow=nothing-here,"], spot));
        assert!(!proxies(&["--metadata-proxy-allow=nothing-here"], root));
        let only = ["--metadata-proxy-allow-only", "meta-data/placement/**"];
        assert!(proxies(&only, region) && !proxies(&only, spot));
        let only_and_more = [
            "--metadata-proxy-allow-only=meta-data/placement/**",
            "--metadata-proxy-allow=meta-data/spot/*",
        ];
        assert!(proxies(&only_and_more, region) && proxies(&only_and_more, spot));
        assert!(
            !proxies(&["--metadata-proxy-allow-only="], spot),
            "empty: nothing"
        );
        for refused in ["/latest/user-data", "/latest/dynamic/instance-identity/pkcs7"] {
            for args in [
                &["--metadata-proxy-allow=**"][..],
                &["--metadata-proxy-allow-only=**"],
            ] {
                assert!(!proxies(args, refused), "{args:?} {refused}");
            }
        }
        let err = allow_list(&parse(&["--metadata-proxy-allow=a["]).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("--metadata-proxy-allow"), "{err:#}");
    }

    #[test]
    fn node_credentials_flags_default_to_kube2iams_and_refuse_malformed_service_accounts() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.host_network_credentials, HostNetworkCredentials::Node);
        assert!(args.node_credentials_for.is_empty());
        let args = parse(&[
            "--host-network-credentials=none",
            "--node-credentials-for",
            "kube-system/aws-node,kube-system/ebs-csi-node",
        ])
        .unwrap();
        assert_eq!(args.host_network_credentials, HostNetworkCredentials::None);
        assert_eq!(
            args.node_credentials_for
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["kube-system/aws-node", "kube-system/ebs-csi-node"]
        );
        assert_eq!(
            parse(&["--host-network-credentials", "default-role"])
                .unwrap()
                .host_network_credentials,
            HostNetworkCredentials::DefaultRole
        );
        let err = parse(&["--node-credentials-for=kube-system/aws-node,aws-node"])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--node-credentials-for")
                && err.contains("\"aws-node\" is not NAMESPACE/SERVICEACCOUNT"),
            "{err}"
        );
        let err = parse(&["--host-network-credentials=nobody"])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("node, default-role, none"), "{err}");
    }

    #[test]
    fn the_kubelets_pod_cgroup_is_found_when_it_is_the_only_one() {
        let mount = std::env::temp_dir().join(format!("interceptor-kubepods-{}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap();
        assert!(detect_kubepods(&mount).is_err(), "none");
        std::fs::create_dir(mount.join("kubepods")).unwrap();
        assert_eq!(detect_kubepods(&mount).unwrap(), mount.join("kubepods"));
        std::fs::create_dir(mount.join("kubepods.slice")).unwrap();
        let err = detect_kubepods(&mount).unwrap_err().to_string();
        assert!(err.contains("both") && err.contains("--cgroup-root"), "{err}");
        std::fs::remove_dir(mount.join("kubepods")).unwrap();
        assert_eq!(detect_kubepods(&mount).unwrap(), mount.join("kubepods.slice"));
        std::fs::remove_dir_all(mount).unwrap();
    }

    #[test]
    fn a_burst_must_refill_within_ten_minutes() {
        let args = parse(&["--pod-request-rate", "2", "--pod-request-burst", "1201"]).unwrap();
        let err = request_quota(&args).unwrap_err().to_string();
        assert!(
            err.contains("--pod-request-burst (1201) takes 10m 500ms"),
            "{err}"
        );
        let args = parse(&["--pod-request-rate", "2", "--pod-request-burst", "1200"]).unwrap();
        assert!(request_quota(&args).is_ok());
    }

    #[test]
    fn a_pod_may_not_hold_more_connections_than_the_agent() {
        let args = parse(&["--max-connections", "100", "--max-connections-per-pod", "101"]).unwrap();
        let err = connection_limits(&args).unwrap_err().to_string();
        assert!(err.contains("--max-connections-per-pod (101)"), "{err}");
        let args = parse(&["--max-connections", "100", "--max-connections-per-pod", "100"]).unwrap();
        assert!(connection_limits(&args).is_ok());
    }
}
