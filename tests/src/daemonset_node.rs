//! The simulated node with the chart's agent DaemonSet on it, run as the kubelet runs it: `helm
//! template`'s agent container (args and env exactly as rendered, downward-API values and `$(VAR)`
//! references filled in by `kubelet`), the real agent binary in a container cgroup of the DaemonSet's
//! pod under kubepods, in-cluster config for the fake API server over HTTPS, which enforces the
//! rendered ClusterRole's rules for the pod's ServiceAccount, and moto as STS, reached directly or
//! through the switchable `StsProxy`. Another chart's DaemonSet (kube2iam's) runs the same way
//! ([`DaemonSetSpec`]). Restarts are the DaemonSet's: a new container cgroup each time.

use std::{
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;

use crate::{
    agent::Agent,
    cgroup::id_of,
    chart,
    kube_api::{self, FakeApiServer},
    kube_node::NODE_NAME,
    kubelet::{self, Kubelet},
    lab::StandIn,
    moto::Moto,
    privileged, python,
    sim::{self, SimNode},
    sts_proxy::StsProxy,
};

/// The README's `helm install`: the chart's defaults name no base ARN, so role names need this one.
pub const DEFAULT_VALUES: &[&str] = &[
    "--set-string",
    "extraArgs.base-role-arn=arn:aws:iam::123456789012:role/",
];
/// Whether the DaemonSet tests can run here: root, the venv's tools, kubectl and helm.
pub fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test) && python::has_kubectl(test)
}

/// The image's environment: its PATH (the container's mount set-up runs sh and mount before the
/// program).
pub fn image_env() -> Vec<(String, String)> {
    vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())]
}

/// Everything the agent container's environment holds beyond what the chart renders and the kubelet
/// adds: the image's, and what the simulation needs because the simulated node is not an EC2
/// instance. The rendered env is set after these, so whatever the chart sets wins.
fn simulation_env(sts_url: String) -> Vec<(String, String)> {
    let simulated = [
        // STS is moto in the node (or the proxy in front of it), not the regional endpoint.
        ("INTERCEPTOR_STS_ENDPOINT", sts_url),
        // The agent's own credentials: on EC2 the SDK gets the instance profile's from the node's
        // metadata service, whose stand-in serves none.
        ("AWS_ACCESS_KEY_ID", "AKIANODEEXAMPLE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "node-secret-key".to_owned()),
        // The region, which on EC2 the SDK reads from the node's metadata service (the stand-in has
        // none); the kube2iam values set it themselves.
        ("AWS_REGION", "us-east-1".to_owned()),
    ];
    let simulated = simulated
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value));
    image_env().into_iter().chain(simulated).collect()
}

/// The namespace the DaemonSet runs in.
const NAMESPACE: &str = "kube-system";

/// A DaemonSet to run the agent from: its rendered pod spec, the agent's container in it, and the
/// rules of the ClusterRole bound to the pod's ServiceAccount, which the API server enforces.
pub struct DaemonSetSpec {
    pub pod_spec: Value,
    pub container: String,
    /// `None`: no ClusterRole (the API server then serves every request).
    pub rules: Option<Vec<PolicyRule>>,
    /// What the simulation adds to the container's environment beyond [`simulation_env`]: where the
    /// simulated node's cgroup tree and bpffs are, for a pod spec that does not mount the host's.
    pub simulation_env: Vec<(String, String)>,
}

impl DaemonSetSpec {
    /// The chart's agent DaemonSet, rendered with `values`, and its ClusterRole if it renders one.
    pub fn chart(values: &[&str]) -> Result<Self> {
        let objects = chart::render(values)?;
        let daemonset = chart::daemonset(&objects, "interceptor");
        let name = daemonset["metadata"]["name"]
            .as_str()
            .context("a DaemonSet without a name")?;
        let rules = match objects.get(&format!("ClusterRole/{name}")) {
            Some(role) => {
                Some(serde_json::from_value(role["rules"].clone()).context("the ClusterRole's rules")?)
            }
            None => None,
        };
        Ok(Self {
            pod_spec: daemonset["spec"]["template"]["spec"].clone(),
            container: "interceptor".to_owned(),
            rules,
            simulation_env: Vec::new(),
        })
    }

    /// The user RBAC knows the pod's ServiceAccount as.
    fn user(&self) -> String {
        let account = self.pod_spec["serviceAccountName"].as_str().unwrap_or("default");
        format!("system:serviceaccount:{NAMESPACE}:{account}")
    }
}

/// The simulated node with the chart's agent DaemonSet on it. Fields drop in order: the agent first,
/// the node last.
pub struct DaemonSetNode {
    pub agent: Agent,
    agent_container: kubelet::Container,
    /// The running agent's container cgroup.
    agent_cgroup: PathBuf,
    /// The DaemonSet's pod on the node: each agent container is a new cgroup below it.
    agent_pod: sim::Pod,
    pub kubelet: Kubelet,
    base_env: Vec<(String, String)>,
    /// Between the agent and moto, when the node was started behind it.
    pub sts_proxy: Option<StsProxy>,
    pub moto: Moto,
    pub api: FakeApiServer,
    pub stand_in: StandIn,
    pub node: SimNode,
}

impl DaemonSetNode {
    /// Renders the chart with `values`, and starts the stand-in, the API server (in-cluster, with the
    /// chart's RBAC), moto and the agent container of the rendered DaemonSet; returns once the agent
    /// logged `ready`.
    pub fn start(node: SimNode, values: &[&str]) -> Result<Self> {
        Self::launch(node, DaemonSetSpec::chart(values)?, |_| {}, false)
    }

    /// [`Self::start`], with the agent reaching moto through an [`StsProxy`] the test can switch.
    pub fn start_behind_sts_proxy(node: SimNode, values: &[&str]) -> Result<Self> {
        Self::launch(node, DaemonSetSpec::chart(values)?, |_| {}, true)
    }

    /// The agent container of `daemonset` on `node`, with `setup` run on the API server before the
    /// agent starts (objects it must find there at once, such as its Node).
    pub fn start_with(
        node: SimNode,
        daemonset: DaemonSetSpec,
        setup: impl FnOnce(&FakeApiServer),
    ) -> Result<Self> {
        Self::launch(node, daemonset, setup, false)
    }

    fn launch(
        mut node: SimNode,
        daemonset: DaemonSetSpec,
        setup: impl FnOnce(&FakeApiServer),
        behind_proxy: bool,
    ) -> Result<Self> {
        let stand_in = StandIn::start(&node)?;
        let api = FakeApiServer::start_in_cluster(&node)?;
        if let Some(rules) = daemonset.rules.clone() {
            api.enforce_rbac(&daemonset.user(), rules);
        }
        setup(&api);
        let moto = Moto::start(&node)?;
        let kubelet = Kubelet::new(&node, NODE_NAME, &api, NAMESPACE)?;
        let agent_container = kubelet.container(&daemonset.pod_spec, &daemonset.container)?;
        let agent_pod = node.pod()?;
        let agent_cgroup = agent_pod.container()?;
        let sts_proxy = if behind_proxy {
            Some(StsProxy::start(&node, moto.addr())?)
        } else {
            None
        };
        let sts_url = sts_proxy.as_ref().map_or_else(|| moto.url(), StsProxy::url);
        let base_env = [simulation_env(sts_url), daemonset.simulation_env].concat();
        let agent = start_agent(&node, &agent_container, &agent_cgroup, &base_env)?;
        Ok(Self {
            agent,
            agent_container,
            agent_cgroup,
            agent_pod,
            kubelet,
            base_env,
            sts_proxy,
            moto,
            api,
            stand_in,
            node,
        })
    }

    /// The DaemonSet's restart: the agent is killed (SIGKILL), the kubelet removes its container's
    /// cgroup, and a new container of the same pod starts in a new one. Returns once it is ready.
    pub fn restart_agent(&mut self) -> Result<()> {
        self.restart_agent_while(|_| {})
    }

    /// [`Self::restart_agent`], with `meanwhile` run on a thread of its own from the kill on, while
    /// the new agent starts (to bring back an API server that was gone, say); returns once both ended.
    pub fn restart_agent_while(&mut self, meanwhile: impl FnOnce(&FakeApiServer) + Send) -> Result<()> {
        self.agent.kill()?;
        std::fs::remove_dir(&self.agent_cgroup)
            .with_context(|| format!("cannot remove {}", self.agent_cgroup.display()))?;
        self.agent_cgroup = self.agent_pod.container()?;
        let api = &self.api;
        self.agent = std::thread::scope(|scope| {
            scope.spawn(move || meanwhile(api));
            start_agent(
                &self.node,
                &self.agent_container,
                &self.agent_cgroup,
                &self.base_env,
            )
        })?;
        Ok(())
    }

    /// Checks that the agent runs as its container does: pinned in the node's bpffs (through its
    /// /sys/fs/bpf), exempting its own container cgroup (found in its cgroup namespace), talking to
    /// the API server at the Service over HTTPS with the ServiceAccount's token.
    pub fn assert_agent_runs_as_in_its_pod(&self) -> Result<()> {
        let pinned = std::fs::read_dir(self.node.bpffs_dir())
            .context("nothing pinned in the node's bpffs")?
            .count();
        ensure!(pinned > 0, "nothing pinned in the node's bpffs");
        let logs = self.agent.logs();
        let exempted = log_entry(&logs, "exempted the agent's own cgroup")?;
        ensure!(
            exempted["cgroup_id"] == id_of(&self.agent_cgroup).0,
            "the agent exempted {exempted}, not its container cgroup"
        );
        let api = log_entry(&logs, "Kubernetes API")?;
        ensure!(
            api["api_server"] == format!("https://{}/", kube_api::SERVICE_IP),
            "{api}"
        );
        let pod_requests: Vec<_> = self
            .api
            .requests()
            .into_iter()
            .filter(|request| request.path == "/api/v1/pods")
            .collect();
        ensure!(!pod_requests.is_empty(), "the agent never listed pods");
        for request in pod_requests {
            ensure!(
                request.token.as_deref() == Some(self.api.token()),
                "a request without the ServiceAccount's token: {request:?}"
            );
        }
        Ok(())
    }
}

fn start_agent(
    node: &SimNode,
    container: &kubelet::Container,
    cgroup: &Path,
    base_env: &[(String, String)],
) -> Result<Agent> {
    Agent::start(container.command(node, cgroup, &Agent::binary()?, base_env)?)
}

/// The agent's log entry whose message is `message`.
pub fn log_entry(logs: &[String], message: &str) -> Result<Value> {
    logs.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|entry| entry["message"] == message)
        .with_context(|| format!("no {message:?} in the agent's log:\n{}", logs.join("\n")))
}

/// When the agent logged `ready`, in µs since the epoch.
pub fn ready_at_us(agent: &Agent) -> Result<u128> {
    // Agent::start returns when it reads the line, which reaches the log a moment later.
    agent.wait_for_log(r#""message":"ready""#)?;
    let ready = log_entry(&agent.logs(), "ready")?;
    let timestamp = ready["timestamp"]
        .as_str()
        .context("a log entry without a timestamp")?;
    let at = humantime::parse_rfc3339_weak(timestamp).with_context(|| format!("timestamp {timestamp}"))?;
    Ok(at.duration_since(UNIX_EPOCH)?.as_micros())
}
