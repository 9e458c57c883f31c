//! status::report: the document `interceptor status` prints (`--output json` prints it as it is; the
//! table renders it), and the part of it the agent answers on its status socket. Field names are the
//! JSON's; see [`super`] for the shape. Nothing here may ever hold a credential, a token or a key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    bpf::inspect::{AttachedProgram, Pins},
    imds::{node_credentials::ServedPod, recent::AnsweredRequest},
    workload::PodRef,
};

/// Everything `interceptor status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: KernelReport,
    pub agent: AgentReport,
}

/// What the kernel says, asked directly: works with no agent running.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    /// The cgroup the programs were looked for on; `None` when none was given, the agent did not say
    /// and no kubepods cgroup was found.
    pub cgroup_root: Option<PathBuf>,
    /// Where `cgroup_root` came from: `flag`, `agent` or `detected`.
    pub cgroup_root_from: Option<&'static str>,
    /// The programs attached to `cgroup_root` itself at the agent's attach points, whoever attached them.
    pub attached: Vec<AttachedProgram>,
    pub bpffs_dir: PathBuf,
    pub pins: Pins,
    /// What could not be read; the command exits 1 when there is any.
    pub errors: Vec<String>,
}

/// What the agent answered on its status socket, or why it did not.
#[derive(Clone, Debug, Serialize)]
pub struct AgentReport {
    pub socket: PathBuf,
    pub reachable: bool,
    pub error: Option<String>,
    #[serde(flatten)]
    pub status: Option<AgentStatus>,
}

/// The agent's answer on its status socket (`GET /status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub pid: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub agent_addr: String,
    pub cgroup_root: PathBuf,
    pub bpffs_dir: PathBuf,
    pub ready: bool,
    /// What readiness still waits for (empty when ready).
    pub not_ready: Vec<String>,
    pub sources: Vec<SourceStatus>,
    pub workloads: Vec<WorkloadStatus>,
    /// The last requests answered, newest first.
    pub attributions: Vec<AttributionStatus>,
    /// The pods given the node's own credentials, the most recent first (an agent that predates them
    /// sends none).
    #[serde(default)]
    pub node_credentials: Vec<NodeCredentialsStatus>,
}

/// A workload source: the static file or the node's pods from Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `static` or `kubernetes`.
    pub kind: String,
    /// The static file's path, or the node whose pods are served.
    pub from: String,
    pub synced: bool,
    pub workloads: usize,
}

/// A workload a source knows and the role it gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// `static` or `kubernetes`.
    pub source: String,
    /// `static/<name>` or `<namespace>/<pod>`.
    pub name: String,
    /// The static entry's cgroup glob.
    pub cgroup: Option<String>,
    pub pod: Option<PodStatus>,
    /// The role ARN its requests get, as the policy resolves it now.
    pub role_arn: Option<String>,
    /// Why it gets no role, when it gets none.
    pub no_role: Option<String>,
    /// Why it gets the node's own credentials (`host_network`, `service_account`), when it does.
    #[serde(default)]
    pub node_credentials: Option<String>,
    /// Where its role comes from: the annotation and the object (pod or ServiceAccount) or workload
    /// file entry that names it, the default role, or the node's credentials.
    #[serde(default)]
    pub role_from: Option<String>,
    /// The namespace restriction the role it names was checked against, when one applies.
    #[serde(default)]
    pub rule: Option<String>,
}

/// `interceptor status --pod NAMESPACE/NAME`: one pod, explained.
#[derive(Clone, Debug, Serialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    /// What the agent knows of it: `None` when it knows no such pod on this node.
    pub workload: Option<WorkloadStatus>,
    /// Its cgroups under the agent's cgroup root (the pod's and its containers'), each with the id the
    /// requests below name.
    pub cgroups: Vec<CgroupStatus>,
    /// Its last requests the agent answered, newest first.
    pub requests: Vec<AttributionStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupStatus {
    pub id: u64,
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl From<&PodRef> for PodStatus {
    fn from(pod: &PodRef) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        }
    }
}

/// One answered metadata request: who the kernel said made it, and what it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributionStatus {
    /// RFC 3339, UTC.
    pub at: String,
    /// `None` for connections the kernel did not redirect (refused as `unattributed`).
    pub cgroup_id: Option<u64>,
    pub socket_cookie: Option<u64>,
    /// The process that connected.
    pub pid: Option<u32>,
    pub workload: Option<String>,
    pub pod: Option<PodStatus>,
    /// What was asked (`credentials`, `token`, `role_list`, ...).
    pub route: String,
    /// The HTTP status answered.
    pub status: u16,
    pub role_arn: Option<String>,
    /// Why it was answered with the node's own credentials, when it was.
    #[serde(default)]
    pub node_credentials: Option<String>,
    /// Why it was refused (the `reason` label of the metrics) and the refusal's message.
    pub reason: Option<String>,
    pub error: Option<String>,
}

impl From<&AnsweredRequest> for AttributionStatus {
    fn from(request: &AnsweredRequest) -> Self {
        let workload = request.workload.as_deref();
        Self {
            at: rfc3339(request.at),
            cgroup_id: request.caller.map(|caller| caller.cgroup_id.0),
            socket_cookie: request.caller.map(|caller| caller.socket_cookie.0),
            pid: request.caller.map(|caller| caller.pid),
            workload: workload.map(|workload| workload.name.clone()),
            pod: workload
                .and_then(|workload| workload.pod.as_ref())
                .map(PodStatus::from),
            route: request.route.to_owned(),
            status: request.status,
            role_arn: request.role.clone(),
            node_credentials: request.node_credentials.map(|grant| grant.label().to_owned()),
            reason: request.refusal.as_ref().map(|(reason, _)| (*reason).to_owned()),
            error: request.refusal.as_ref().map(|(_, message)| message.clone()),
        }
    }
}

/// A pod given the node's own credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredentialsStatus {
    pub pod: PodStatus,
    /// `host_network` or `service_account`.
    pub grant: String,
    /// Credential documents it was given.
    pub answers: u64,
    /// RFC 3339, UTC.
    pub first_at: String,
    pub last_at: String,
}

impl From<&ServedPod> for NodeCredentialsStatus {
    fn from(served: &ServedPod) -> Self {
        Self {
            pod: PodStatus::from(&served.pod),
            grant: served.grant.label().to_owned(),
            answers: served.answers,
            first_at: rfc3339(served.first),
            last_at: rfc3339(served.last),
        }
    }
}

/// `time` as RFC 3339 in UTC.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    OffsetDateTime::from(time)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "?".to_owned())
}
