//! agent::status: what the agent answers `interceptor status` on its status socket: its settings,
//! readiness, workload sources, the workloads they know with the role the policy gives each (or the
//! node's credentials), the requests the metadata API answered last, and the pods given the node's
//! credentials.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use super::Sources;
use crate::{
    imds::{
        ImdsError,
        node_credentials::{Entitlement, NodeCredentials},
        recent::RecentRequests,
    },
    policy::Policy,
    status::{
        report::{
            AgentStatus, AttributionStatus, NodeCredentialsStatus, PodStatus, SourceStatus, WorkloadStatus,
            rfc3339,
        },
        socket::{self, StatusSocket},
    },
    telemetry::Telemetry,
    workload::{Workload, WorkloadError},
};

/// The parts of a running agent its status is read from.
pub(super) struct AgentView {
    pub started_at: SystemTime,
    pub agent_addr: SocketAddrV4,
    pub cgroup_root: PathBuf,
    pub bpffs_dir: PathBuf,
    pub telemetry: Arc<Telemetry>,
    pub sources: Sources,
    pub policy: Policy,
    pub node_credentials: Arc<NodeCredentials>,
    pub recent: Arc<RecentRequests>,
}

/// Serves `view` on the status socket at `path`, unless `path` is empty. A socket that cannot be made
/// is logged, not fatal: the agent's job is serving credentials, and `interceptor status` still
/// reports the kernel's part without it.
pub(super) fn serve(path: &Path, view: AgentView) -> Option<StatusSocket> {
    if path.as_os_str().is_empty() {
        return None;
    }
    match socket::serve(path, move || view.status()) {
        Ok(socket) => {
            tracing::info!(path = %path.display(), "status socket listening");
            Some(socket)
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), error = format!("{err:#}"),
                "no status socket: `interceptor status` will show the kernel's state only");
            None
        }
    }
}

impl AgentView {
    fn status(&self) -> AgentStatus {
        let not_ready: Vec<String> = self
            .telemetry
            .readiness
            .missing()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let (sources, workloads) = self.workloads();
        AgentStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: rfc3339(self.started_at),
            agent_addr: self.agent_addr.to_string(),
            cgroup_root: self.cgroup_root.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
            ready: not_ready.is_empty(),
            not_ready,
            sources,
            workloads,
            attributions: self
                .recent
                .newest_first()
                .iter()
                .map(AttributionStatus::from)
                .collect(),
            node_credentials: self
                .node_credentials
                .pods_served()
                .iter()
                .map(NodeCredentialsStatus::from)
                .collect(),
        }
    }

    fn workloads(&self) -> (Vec<SourceStatus>, Vec<WorkloadStatus>) {
        let (mut sources, mut workloads) = (Vec::new(), Vec::new());
        if let Some(file) = &self.sources.file {
            let entries = file.entries();
            sources.push(SourceStatus {
                kind: "static".to_owned(),
                from: file.path().display().to_string(),
                synced: true,
                workloads: entries.len(),
            });
            workloads.extend(entries.into_iter().map(|(cgroup, workload)| WorkloadStatus {
                cgroup: Some(cgroup),
                ..self.workload_status("static", Ok(&workload))
            }));
        }
        if let Some(kube) = &self.sources.pods {
            let pods = kube.pods();
            sources.push(SourceStatus {
                kind: "kubernetes".to_owned(),
                from: kube.node().to_owned(),
                synced: kube.is_synced(),
                workloads: pods.len(),
            });
            workloads.extend(pods.iter().map(|(pod, workload)| WorkloadStatus {
                name: format!("{}/{}", pod.namespace, pod.name),
                pod: Some(PodStatus::from(pod)),
                ..self.workload_status("kubernetes", workload.as_ref())
            }));
        }
        (sources, workloads)
    }

    /// The role `workload` gets from the policy now, or the node's credentials, or why it gets none.
    fn workload_status(
        &self,
        source: &str,
        workload: Result<&Arc<Workload>, &WorkloadError>,
    ) -> WorkloadStatus {
        let (role_arn, no_role, node_credentials) = match workload {
            Err(err) => (None, Some(crate::error_chain(err)), None),
            Ok(workload) => match self.node_credentials.entitlement(workload) {
                Entitlement::Node(grant) => (None, None, Some(grant.label().to_owned())),
                Entitlement::Nothing => (None, Some(ImdsError::HostNetworkWithoutRole.to_string()), None),
                Entitlement::Policy => match self.policy.session(&workload.request, &workload.session_name) {
                    Ok(session) => (Some(session.role.to_string()), None, None),
                    Err(err) => (None, Some(crate::error_chain(&err)), None),
                },
            },
        };
        let role_from = workload
            .ok()
            .and_then(|workload| self.role_from(workload, node_credentials.as_deref()));
        let rule = workload
            .ok()
            .and_then(|workload| workload.request.allowed.as_ref())
            .map(|allowed| allowed.describe());
        WorkloadStatus {
            source: source.to_owned(),
            name: workload.map(|workload| workload.name.clone()).unwrap_or_default(),
            cgroup: None,
            pod: workload
                .ok()
                .and_then(|workload| workload.pod.as_ref())
                .map(PodStatus::from),
            role_arn,
            no_role,
            node_credentials,
            role_from,
            rule,
        }
    }

    /// Where `workload`'s role comes from: the node's credentials' grant, the object and annotation
    /// (or workload file entry) that names it, or the default role.
    fn role_from(&self, workload: &Workload, node_credentials: Option<&str>) -> Option<String> {
        if let Some(grant) = node_credentials {
            return Some(format!("the node's own credentials ({grant})"));
        }
        match &workload.request.role {
            Some(_) => workload.request.origin.as_deref().map(str::to_owned),
            None => self.policy.default_role.as_ref().map(|role| {
                format!(
                    "the default role {} (--default-role; it names none)",
                    crate::Echo(role)
                )
            }),
        }
    }
}
