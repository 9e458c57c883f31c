//! The simulated node with a real container runtime: the tests' containerd (CRI plugin, runc, bridge
//! CNI) in the node, driven through CRI as the kubelet drives it. The agent runs from its image
//! (`cargo xtask image`, imported without a registry) as the chart's DaemonSet container, the rendered
//! pod spec translated as the kubelet translates it ([`KubeletTranslation`]); workloads are pods of a
//! busybox image under the kubelet's cgroup parents, with their Pod objects in the fake API server.
//! moto plays STS and the stand-in the node's metadata service, as in every other node of the tests.
//!
//! It owns the kubelet's side: the pods it made (stopped and removed by [`CriNode::shutdown`], and by
//! containerd's teardown when a test fails first), their directories (logs, emptyDirs, the
//! ServiceAccount's files) and the kubelet's cgroup root.

use std::{
    collections::BTreeMap,
    env,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    agent::NO_STS,
    containerd::{Containerd, KubeletCgroupRoot, PAUSE_IMAGE},
    cri::{
        ContainerSpec, Cri, ExecOutput, PodSpec, QosClass,
        api::{
            Capability, ContainerConfig, ContainerState, Int64Value, LinuxContainerResources, Mount,
            MountPropagation, SecurityProfile, security_profile::ProfileType,
        },
        kubelet_cgroup_parent,
    },
    deployed::{self, Sts},
    kube_api::FakeApiServer,
    kube_node::{self, NODE_NAME},
    kubelet::{self, SERVICE_ACCOUNT_DIR},
    lab::StandIn,
    moto::Moto,
    oci_archive, privileged,
    sim::{self, SimNode},
};

/// The variable `cargo xtask test` sets to the agent image it built (`oci-archive`), a dev build.
pub const AGENT_IMAGE_VAR: &str = "INTERCEPTOR_TEST_IMAGE";
/// Where the agent image is imported: the chart is rendered with this `image.repository`.
const AGENT_REPOSITORY: &str = "localhost/interceptor";
/// Workload containers' image: busybox and `sim-client`, their metadata client.
pub const WORKLOAD_IMAGE: &str = "localhost/interceptor-test/workload:1";
/// The DaemonSet's namespace and the agent container's name in the chart.
const AGENT_NAMESPACE: &str = "kube-system";
const AGENT_CONTAINER: &str = "interceptor";
/// The chart's `--bpffs-dir`, in the runtime's mount namespace.
pub const AGENT_BPFFS_DIR: &str = "/sys/fs/bpf/interceptor";
/// How long the agent container may take from `StartContainer` to ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// The deadline of an `ExecSync` the tests make.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent image `cargo xtask test` built, when the runtime tests can run: root, the venv's helm
/// (and moto), and [`AGENT_IMAGE_VAR`] set. With `CI` set, a missing piece fails the test instead of
/// skipping it.
pub fn agent_image(test: &str) -> Option<PathBuf> {
    if !(privileged::can_run(test) && privileged::has_python_tools(test)) {
        return None;
    }
    match env::var_os(AGENT_IMAGE_VAR) {
        Some(path) => Some(PathBuf::from(path)),
        None if env::var_os("CI").is_some() => {
            panic!("{test}: {AGENT_IMAGE_VAR} is not set: run the tests through `cargo xtask test`")
        }
        None => {
            eprintln!("SKIPPING {test}: {AGENT_IMAGE_VAR} is not set (`cargo xtask test` builds the image)");
            None
        }
    }
}

/// A pod the kubelet made through CRI: its spec, its sandbox and its containers (newest last).
pub struct CriPod {
    pub spec: PodSpec,
    pub sandbox_id: String,
    pub containers: Vec<String>,
}

impl CriPod {
    /// The pod's newest container.
    pub fn container_id(&self) -> &str {
        self.containers.last().expect("a pod is made with a container")
    }
}

/// A workload pod: a busybox container in the pod network (or the node's), known to the API server.
pub struct Workload {
    pub pod: CriPod,
    /// Its container's cgroup, as runc made it: `<cgroup2>/<parent>/<container id>`.
    pub cgroup: PathBuf,
}

impl Workload {
    /// `namespace/name`, as the agent names the workload.
    pub fn name(&self) -> String {
        self.pod.spec.display_name()
    }
}

/// The agent's DaemonSet pod on the node, and how the kubelet makes its container.
pub struct AgentPod {
    pub pod: CriPod,
    /// The rendered container, translated; each restart makes it again with the next attempt.
    config: ContainerConfig,
}

impl AgentPod {
    /// The agent container's cgroup, as runc made it.
    pub fn cgroup(&self) -> Result<PathBuf> {
        Ok(interceptor::identity::cgroup2_mount()?
            .join(self.pod.spec.cgroup_parent.trim_start_matches('/'))
            .join(self.pod.container_id()))
    }

    /// The agent's pid (its container's first process).
    pub fn pid(&self) -> Result<u32> {
        container_pid(&self.cgroup()?)
    }

    /// The capabilities its container is given: the security context's `add` list (it drops ALL).
    pub fn granted_capabilities(&self) -> Vec<String> {
        capabilities_of(&self.config).add_capabilities.clone()
    }
}

fn capabilities_of(config: &ContainerConfig) -> &Capability {
    config
        .linux
        .as_ref()
        .and_then(|linux| linux.security_context.as_ref())
        .and_then(|context| context.capabilities.as_ref())
        .expect("a translated config has capabilities")
}

/// Takes `capability` out of the config's added capabilities (the ablation of one).
pub fn take_capability(config: &mut ContainerConfig, capability: &str) {
    config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
        .and_then(|context| context.capabilities.as_mut())
        .expect("a translated config has capabilities")
        .add_capabilities
        .retain(|name| name != capability);
}

/// The capability set (as `/proc/PID/status` prints it) of capability names as a pod spec gives
/// them (`BPF`, `NET_ADMIN`).
pub fn capability_mask(names: &[String]) -> Result<u64> {
    const BITS: &[(&str, u32)] = &[
        ("CHOWN", 0),
        ("DAC_OVERRIDE", 1),
        ("DAC_READ_SEARCH", 2),
        ("FOWNER", 3),
        ("KILL", 5),
        ("SETGID", 6),
        ("SETUID", 7),
        ("NET_BIND_SERVICE", 10),
        ("NET_ADMIN", 12),
        ("NET_RAW", 13),
        ("IPC_LOCK", 14),
        ("SYS_CHROOT", 18),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("SYS_RESOURCE", 24),
        ("PERFMON", 38),
        ("BPF", 39),
    ];
    names.iter().try_fold(0, |mask, name| {
        let bit = BITS
            .iter()
            .find(|(known, _)| known == name)
            .with_context(|| format!("capability {name} is not in the tests' table"))?
            .1;
        Ok(mask | 1 << bit)
    })
}

pub struct CriNode {
    pub agent: Option<AgentPod>,
    pub workloads: Vec<Workload>,
    pub cri: Cri,
    pub containerd: Containerd,
    cgroup_root: KubeletCgroupRoot,
    kubelet_dir: tempfile::TempDir,
    /// STS, unless the node was started with it down.
    pub moto: Option<Moto>,
    pub api: FakeApiServer,
    pub stand_in: StandIn,
    pub node: SimNode,
}

impl CriNode {
    /// Starts the stand-in, the API server (in-cluster), moto (unless `sts` is down) and containerd in
    /// `node`, and imports the agent image at `agent_image`, the pause image and the workload image.
    pub async fn start(node: SimNode, agent_image: &Path, sts: Sts) -> Result<Self> {
        let stand_in = StandIn::start(&node)?;
        let api = FakeApiServer::start_in_cluster(&node)?;
        api.apply_node(kube_node::node_object(&[]));
        let moto = match sts {
            Sts::Moto => Some(Moto::start(&node)?),
            Sts::Down => None,
        };
        let kubelet_dir = tempfile::Builder::new().prefix("itc-kubelet-").tempdir()?;
        let cgroup_root = KubeletCgroupRoot::new();
        let containerd = Containerd::start(&node)?;
        let pause = kubelet_dir.path().join("pause.tar");
        oci_archive::write_sleeper(&pause, "1")?;
        containerd.import_image(&pause, PAUSE_IMAGE.trim_end_matches(":1"))?;
        let workload = kubelet_dir.path().join("workload.tar");
        oci_archive::write_workload(&workload, "1", &crate::built_binary("sim-client")?)?;
        containerd.import_image(&workload, WORKLOAD_IMAGE.trim_end_matches(":1"))?;
        containerd.import_image(agent_image, AGENT_REPOSITORY)?;
        let cri = Cri::connect(containerd.socket()).await?;
        Ok(Self {
            agent: None,
            workloads: Vec::new(),
            cri,
            containerd,
            cgroup_root,
            kubelet_dir,
            moto,
            api,
            stand_in,
            node,
        })
    }

    /// The kubelet's `--cgroup-root` on this node.
    pub fn cgroup_root(&self) -> &str {
        self.cgroup_root.path()
    }

    /// The agent's `--cgroup-root` as seen in its container: the kubelet's pod cgroups under the
    /// cgroup2 mount of the node's `/sys/fs/cgroup`, which the chart mounts at the same path.
    pub fn agent_cgroup_root(&self) -> Result<String> {
        let mount = interceptor::identity::cgroup2_mount()?;
        Ok(format!("{}{}/kubepods", mount.display(), self.cgroup_root()))
    }

    /// The chart's values for this node: the image as imported, the cgroup root, and what the
    /// simulation needs because the node is no EC2 instance (STS is moto, the agent's own credentials
    /// and region are given), all through the chart's own values.
    pub fn chart_values(&self) -> Result<Vec<String>> {
        let mut values: Vec<String> = crate::daemonset_node::DEFAULT_VALUES
            .iter()
            .map(|value| (*value).to_owned())
            .collect();
        for (key, value) in [
            ("image.repository", AGENT_REPOSITORY.to_owned()),
            ("cgroupRoot", self.agent_cgroup_root()?),
            (
                "extraEnv.INTERCEPTOR_STS_ENDPOINT",
                self.moto.as_ref().map_or_else(|| NO_STS.to_owned(), Moto::url),
            ),
            ("extraEnv.AWS_ACCESS_KEY_ID", "AKIANODEEXAMPLE".to_owned()),
            ("extraEnv.AWS_SECRET_ACCESS_KEY", "node-secret-key".to_owned()),
            ("extraEnv.AWS_REGION", "us-east-1".to_owned()),
        ] {
            values.push("--set-string".to_owned());
            values.push(format!("{key}={value}"));
        }
        Ok(values)
    }

    /// Renders the chart with [`Self::chart_values`] and `extra` values, and starts its agent
    /// container as the kubelet would, with `adjust` applied to the translated config (a capability
    /// taken away, say). Returns once the agent answers its readiness probe.
    pub async fn start_agent(
        &mut self,
        extra: &[&str],
        adjust: impl FnOnce(&mut ContainerConfig),
    ) -> Result<()> {
        let pod_spec = self.rendered_pod_spec(extra)?;
        let spec = self.pod_spec(
            &crate::unique_name("interceptor-"),
            AGENT_NAMESPACE,
            QosClass::Burstable,
            true,
        );
        let translation = KubeletTranslation::new(self, &spec)?;
        let mut config = translation.container_config(&pod_spec, AGENT_CONTAINER)?;
        adjust(&mut config);
        let sandbox_id = self.run_sandbox(&spec).await?;
        let container_id = self.create_and_start(&spec, &sandbox_id, &config).await?;
        self.agent = Some(AgentPod {
            pod: CriPod {
                spec,
                sandbox_id,
                containers: vec![container_id],
            },
            config,
        });
        self.wait_until_agent_ready().await
    }

    /// The pod spec of the chart's DaemonSet `daemonset`, rendered for this node with `extra` values.
    pub fn rendered_pod_spec_of(&self, daemonset: &str, extra: &[&str]) -> Result<Value> {
        let mut values = self.chart_values()?;
        values.extend(extra.iter().map(|value| (*value).to_owned()));
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let objects = crate::chart::render(&values)?;
        Ok(crate::chart::daemonset(&objects, daemonset)["spec"]["template"]["spec"].clone())
    }

    /// The agent DaemonSet's pod spec, rendered for this node with `extra` values.
    pub fn rendered_pod_spec(&self, extra: &[&str]) -> Result<Value> {
        self.rendered_pod_spec_of("interceptor", extra)
    }

    /// Runs init container `container` of a pod of `pod_spec` (hostNetwork, in kube-system) to
    /// completion, as the kubelet runs an init container; returns its exit code and log.
    pub async fn run_init_container(&mut self, pod_spec: &Value, container: &str) -> Result<(i32, String)> {
        let spec = self.pod_spec(
            &crate::unique_name("uninstall-"),
            AGENT_NAMESPACE,
            QosClass::Burstable,
            true,
        );
        let config = KubeletTranslation::new(self, &spec)?.container_config(pod_spec, container)?;
        let sandbox_id = self.run_sandbox(&spec).await?;
        let container_id = self.create_and_start(&spec, &sandbox_id, &config).await?;
        let deadline = Instant::now() + READY_DEADLINE;
        let status = loop {
            let status = self.cri.container_status(&container_id).await?;
            if status.state == ContainerState::ContainerExited as i32 {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "{container} still runs after {READY_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = std::fs::read_to_string(spec.log_directory().join(&config.log_path)).unwrap_or_default();
        self.cri.stop_pod_sandbox(&sandbox_id).await?;
        self.cri.remove_pod_sandbox(&sandbox_id).await?;
        Ok((status.exit_code, log))
    }

    /// Removes the agent's pod as the kubelet removes a deleted pod, then what its agent left in the
    /// kernel, with `interceptor uninstall` (the host's build of the same sources) on the runtime's
    /// bpffs: the node is as before the agent.
    pub async fn remove_agent(&mut self) -> Result<()> {
        let agent = self.agent.take().context("the agent was not started")?;
        self.cri.stop_pod_sandbox(&agent.pod.sandbox_id).await?;
        self.cri.remove_pod_sandbox(&agent.pod.sandbox_id).await?;
        let out = Command::new(crate::agent::Agent::binary()?)
            .arg("uninstall")
            .arg("--bpffs-dir")
            .arg(self.containerd.path_in_mount_namespace(AGENT_BPFFS_DIR))
            .output()
            .context("cannot run interceptor uninstall")?;
        ensure!(
            out.status.success(),
            "interceptor uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The agent pod, once started.
    pub fn agent(&self) -> Result<&AgentPod> {
        self.agent.as_ref().context("the agent was not started")
    }

    /// The kubelet's restart of the agent's container: `StopContainer` with `grace` (zero: SIGKILL at
    /// once, as a crashed container is gone), `RemoveContainer`, then the container again with the
    /// next attempt, in the same sandbox. Returns once ready, with how long the stop took. A stop
    /// with grace must end with the agent's own exit, code 0.
    pub async fn restart_agent(&mut self, grace: Duration) -> Result<Duration> {
        let agent = self.agent.as_mut().context("the agent was not started")?;
        let old = agent.pod.container_id().to_owned();
        let stopping = Instant::now();
        self.cri.stop_container(&old, grace).await?;
        let stopped_in = stopping.elapsed();
        if !grace.is_zero() {
            let status = self.cri.container_status(&old).await?;
            ensure!(
                status.exit_code == 0,
                "the agent exited {} ({}) on SIGTERM",
                status.exit_code,
                status.reason
            );
        }
        self.cri.remove_container(&old).await?;
        let metadata = agent
            .config
            .metadata
            .as_mut()
            .context("a config without metadata")?;
        metadata.attempt += 1;
        agent.config.log_path = format!("{}/{}.log", metadata.name, metadata.attempt);
        let (spec, sandbox_id, config) = (
            agent.pod.spec.clone(),
            agent.pod.sandbox_id.clone(),
            agent.config.clone(),
        );
        let container_id = self.create_and_start(&spec, &sandbox_id, &config).await?;
        self.agent
            .as_mut()
            .expect("checked above")
            .pod
            .containers
            .push(container_id);
        self.wait_until_agent_ready().await?;
        Ok(stopped_in)
    }

    /// Polls the agent's readiness as the kubelet's readinessProbe does, until ready or the container
    /// exits (its log then says why) or the deadline passes.
    async fn wait_until_agent_ready(&self) -> Result<()> {
        let agent = self.agent()?;
        let container_id = agent.pod.container_id();
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok((200, _)) = deployed::health(&self.node, "/readyz").await {
                return Ok(());
            }
            let status = self.cri.container_status(container_id).await?;
            if status.state == ContainerState::ContainerExited as i32 || Instant::now() >= deadline {
                bail!(
                    "the agent container did not get ready (state {:?}, exit code {}, {}); its log:\n{}",
                    ContainerState::try_from(status.state),
                    status.exit_code,
                    status.reason,
                    self.agent_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent container's log as the runtime wrote it (CRI log lines), every attempt's.
    pub fn agent_log(&self) -> String {
        let Some(agent) = &self.agent else {
            return String::new();
        };
        let dir = agent.pod.spec.log_directory().join(AGENT_CONTAINER);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| entries.filter_map(|entry| Some(entry.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|file| std::fs::read_to_string(file).unwrap_or_default())
            .collect()
    }

    /// `ExecSync` in the agent's container, as `kubectl exec ds/interceptor -- ...` runs it.
    pub async fn exec_in_agent(&self, cmd: &[&str]) -> Result<ExecOutput> {
        let agent = self.agent()?;
        self.cri
            .exec_sync(agent.pod.container_id(), cmd, EXEC_TIMEOUT)
            .await
    }

    /// A workload pod `namespace/name` with `annotations`: its Pod object in the API server, then its
    /// sandbox (the pod network, or the node's with `host_network`) and a busybox container through
    /// CRI, under the BestEffort parent. Returns its index in [`Self::workloads`].
    pub async fn run_workload(
        &mut self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        host_network: bool,
    ) -> Result<usize> {
        let spec = self.pod_spec(name, namespace, QosClass::BestEffort, host_network);
        let uid = spec.uid.clone();
        let parent = spec.cgroup_parent.clone();
        let mut object = kube_node::object_only_pod(namespace, name, annotations);
        object.metadata.uid = Some(uid.clone());
        object
            .spec
            .as_mut()
            .expect("object_only_pod has a spec")
            .host_network = Some(host_network);
        self.api.apply_pod(object);
        let sandbox_id = self.run_sandbox(&spec).await?;
        let config = ContainerSpec::new("app", WORKLOAD_IMAGE).container_config(&spec);
        let container_id = self.create_and_start(&spec, &sandbox_id, &config).await?;
        let cgroup = interceptor::identity::cgroup2_mount()?
            .join(parent.trim_start_matches('/'))
            .join(&container_id);
        ensure!(cgroup.is_dir(), "runc made no cgroup at {}", cgroup.display());
        self.workloads.push(Workload {
            pod: CriPod {
                spec,
                sandbox_id,
                containers: vec![container_id],
            },
            cgroup,
        });
        Ok(self.workloads.len() - 1)
    }

    /// GETs `path` from the metadata address inside workload `index`'s container with `sim-client
    /// http` (IMDSv1, a new connection): the body of a 200, or what went wrong.
    pub async fn metadata_get(
        &self,
        index: usize,
        path: &str,
    ) -> Result<std::result::Result<String, String>> {
        let out = self
            .cri
            .exec_sync(
                self.workloads[index].pod.container_id(),
                &[
                    "/bin/sim-client",
                    "http",
                    &format!("{}:80", sim::METADATA_IP),
                    "--path",
                    path,
                ],
                EXEC_TIMEOUT,
            )
            .await?;
        Ok(if out.exit_code == 0 {
            Ok(out.stdout_text().trim_end().to_owned())
        } else {
            Err(out.stderr_text().trim().to_owned())
        })
    }

    /// `ExecSync` of `cmd` in workload `index`'s container: its standard output and error, whatever
    /// its exit code.
    pub async fn exec_in_workload(&self, index: usize, cmd: &[&str]) -> Result<String> {
        let out = self
            .cri
            .exec_sync(self.workloads[index].pod.container_id(), cmd, EXEC_TIMEOUT)
            .await?;
        Ok(format!("{}{}", out.stdout_text(), out.stderr_text()))
    }

    /// A command run in workload `index`'s network namespace and container cgroup (joined as `runc
    /// exec` joins them), for clients the busybox image lacks (`sim-client probe`).
    pub fn command_in_workload(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let workload = &self.workloads[index];
        let pid = container_pid(&workload.cgroup)?;
        crate::netns::command_in(
            Path::new(&format!("/proc/{pid}/ns/net")),
            &workload.cgroup,
            program,
        )
    }

    /// A new pod of this node's kubelet: a fresh UID, the cgroup parent of its QoS class, its logs
    /// in the kubelet's directory.
    fn pod_spec(&self, name: &str, namespace: &str, qos: QosClass, host_network: bool) -> PodSpec {
        let uid = sim::random_pod_uid();
        let parent = kubelet_cgroup_parent(self.cgroup_root(), qos, &uid);
        let mut spec = PodSpec::new(name, namespace, &uid, &parent);
        spec.host_network = host_network;
        spec.logs_dir = self.kubelet_dir.path().join("logs");
        spec
    }

    async fn run_sandbox(&self, spec: &PodSpec) -> Result<String> {
        std::fs::create_dir_all(spec.log_directory())?;
        self.cri.run_pod_sandbox(&spec.sandbox_config()).await
    }

    async fn create_and_start(
        &self,
        spec: &PodSpec,
        sandbox_id: &str,
        config: &ContainerConfig,
    ) -> Result<String> {
        if let Some(parent) = spec.log_directory().join(&config.log_path).parent() {
            std::fs::create_dir_all(parent)?;
        }
        let container_id = self
            .cri
            .create_container(sandbox_id, config, &spec.sandbox_config())
            .await?;
        self.cri
            .start_container(&container_id)
            .await
            .with_context(|| format!("containerd's log:\n{}", self.containerd.log_tail()))?;
        Ok(container_id)
    }

    /// Stops and removes every pod as the kubelet does when pods go; containerd and the cgroup root
    /// go when the node is dropped.
    pub async fn shutdown(mut self) -> Result<()> {
        let pods: Vec<CriPod> = self
            .agent
            .take()
            .map(|agent| agent.pod)
            .into_iter()
            .chain(self.workloads.drain(..).map(|workload| workload.pod))
            .collect();
        for pod in pods {
            self.cri.stop_pod_sandbox(&pod.sandbox_id).await?;
            self.cri.remove_pod_sandbox(&pod.sandbox_id).await?;
        }
        Ok(())
    }
}

/// The pid of a process in a container cgroup (its first).
fn container_pid(cgroup: &Path) -> Result<u32> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .with_context(|| format!("cannot read {}/cgroup.procs", cgroup.display()))?;
    procs
        .lines()
        .next()
        .with_context(|| format!("no process in {}", cgroup.display()))?
        .parse()
        .context("a pid that is no number")
}

/// The kubelet's translation of a pod spec's container into a CRI `ContainerConfig`
/// (`kuberuntime_container.go` `generateContainerConfig` and the Linux part), for the fields the
/// chart uses: args and env with the downward API and `$(VAR)` references, the security context,
/// resources, and volumes.
pub struct KubeletTranslation {
    pod: PodSpec,
    /// Where the pod's volumes live on the node: `<kubelet dir>/pods/<uid>/volumes`.
    volumes_dir: PathBuf,
    /// What the ServiceAccount admission's projected volume holds, written there.
    service_account_dir: PathBuf,
    /// containerd's pid: memory-backed emptyDirs are mounted in its mount namespace (the node's, for
    /// the runtime).
    containerd_pid: u32,
}

impl KubeletTranslation {
    fn new(node: &CriNode, pod: &PodSpec) -> Result<Self> {
        let volumes_dir = node
            .kubelet_dir
            .path()
            .join("pods")
            .join(&pod.uid)
            .join("volumes");
        let service_account_dir = volumes_dir.join("kubernetes.io~projected/kube-api-access");
        std::fs::create_dir_all(&service_account_dir)?;
        node.api
            .write_service_account(&service_account_dir, &pod.namespace)?;
        Ok(Self {
            pod: pod.clone(),
            volumes_dir,
            service_account_dir,
            containerd_pid: node.containerd.pid(),
        })
    }

    /// The `CreateContainer` config of container (or init container) `name` of `pod_spec`.
    pub fn container_config(&self, pod_spec: &Value, name: &str) -> Result<ContainerConfig> {
        let container = kubelet::container_of(pod_spec, name)?;
        let fields = BTreeMap::from([
            ("status.hostIP".to_owned(), sim::NODE_IP.to_string()),
            ("status.podIP".to_owned(), sim::NODE_IP.to_string()),
            ("spec.nodeName".to_owned(), NODE_NAME.to_owned()),
        ]);
        let env = kubelet::container_env(container, &fields, &FakeApiServer::in_cluster_env())?;
        let mut spec = ContainerSpec::new(
            name,
            container["image"]
                .as_str()
                .context("a container without an image")?,
        );
        spec.args = kubelet::container_args(container, &env);
        spec.envs = env;
        let mut config = spec.container_config(&self.pod);
        let linux = config.linux.as_mut().expect("container_config sets linux");
        linux.resources = Some(resources(&container["resources"], pod_spec)?);
        let context = linux
            .security_context
            .as_mut()
            .expect("container_config sets a security context");
        apply_security_context(context, &container["securityContext"])?;
        config.mounts = self.mounts(pod_spec, container)?;
        Ok(config)
    }

    fn mounts(&self, pod_spec: &Value, container: &Value) -> Result<Vec<Mount>> {
        let volumes = pod_spec["volumes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().context("a volumeMount without a name")?;
            let volume = volumes
                .iter()
                .find(|volume| volume["name"] == name)
                .with_context(|| format!("no volume {name}"))?;
            let host_path = if let Some(path) = volume["hostPath"]["path"].as_str() {
                if volume["hostPath"]["type"] == "DirectoryOrCreate" {
                    std::fs::create_dir_all(path)?;
                }
                PathBuf::from(path)
            } else if volume["emptyDir"].is_object() {
                self.empty_dir(name, &volume["emptyDir"])?
            } else {
                bail!("only hostPath and emptyDir volumes are translated: {volume}");
            };
            let propagation = match mount["mountPropagation"].as_str() {
                None | Some("None") => MountPropagation::PropagationPrivate,
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                Some(other) => bail!("mountPropagation {other}"),
            };
            mounts.push(Mount {
                container_path: mount["mountPath"]
                    .as_str()
                    .context("a volumeMount without a path")?
                    .to_owned(),
                host_path: host_path.to_string_lossy().into_owned(),
                readonly: mount["readOnly"] == true,
                selinux_relabel: false,
                propagation: propagation as i32,
            });
        }
        if pod_spec["automountServiceAccountToken"] != false {
            mounts.push(Mount {
                container_path: SERVICE_ACCOUNT_DIR.to_owned(),
                host_path: self.service_account_dir.to_string_lossy().into_owned(),
                readonly: true,
                selinux_relabel: false,
                propagation: MountPropagation::PropagationPrivate as i32,
            });
        }
        Ok(mounts)
    }

    /// An emptyDir's directory; a memory-backed one gets a tmpfs of its size limit, mounted where
    /// the runtime sees it (containerd's mount namespace is the node's, for it).
    fn empty_dir(&self, name: &str, empty_dir: &Value) -> Result<PathBuf> {
        let dir = self.volumes_dir.join("kubernetes.io~empty-dir").join(name);
        std::fs::create_dir_all(&dir)?;
        if empty_dir["medium"] == "Memory" {
            let mut options = "mode=0777".to_owned();
            if let Some(limit) = empty_dir["sizeLimit"].as_str() {
                options.push_str(&format!(",size={}", quantity_bytes(limit)?));
            }
            let status = Command::new("nsenter")
                .arg(format!("--mount=/proc/{}/ns/mnt", self.containerd_pid))
                .args(["--", "mount", "-t", "tmpfs", "-o", &options, "tmpfs"])
                .arg(&dir)
                .status()
                .context("cannot run nsenter")?;
            ensure!(
                status.success(),
                "cannot mount the emptyDir {name}'s tmpfs: {status}"
            );
        }
        Ok(dir)
    }
}

/// Sets what the kubelet derives from a container's `securityContext` (`determineEffectiveSecurityContext`
/// and `convertToRuntimeSecurityContext`): capabilities, privileged, runAsUser, read-only root, no new
/// privileges (`allowPrivilegeEscalation: false`), seccomp and AppArmor (in both the fields and the
/// deprecated strings, as the kubelet sends them to runtimes of either age).
// containerd 1.6 reads the AppArmor profile from the deprecated string only.
#[allow(deprecated)]
pub fn apply_security_context(
    context: &mut crate::cri::api::LinuxContainerSecurityContext,
    security: &Value,
) -> Result<()> {
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect()
    };
    context.capabilities = Some(Capability {
        add_capabilities: names(&security["capabilities"]["add"]),
        drop_capabilities: names(&security["capabilities"]["drop"]),
        add_ambient_capabilities: Vec::new(),
    });
    context.privileged = security["privileged"] == true;
    if let Some(user) = security["runAsUser"].as_i64() {
        context.run_as_user = Some(Int64Value { value: user });
    }
    context.readonly_rootfs = security["readOnlyRootFilesystem"] == true;
    context.no_new_privs = security["allowPrivilegeEscalation"] == false;
    // Unset, the kubelet sends seccomp Unconfined (SeccompDefault off) and AppArmor RuntimeDefault.
    let (seccomp, seccomp_path) = profile(security, "seccompProfile", ProfileType::Unconfined)?;
    context.seccomp = Some(seccomp);
    context.seccomp_profile_path = seccomp_path.to_owned();
    let (apparmor, apparmor_name) = profile(security, "appArmorProfile", ProfileType::RuntimeDefault)?;
    context.apparmor = Some(apparmor);
    context.apparmor_profile = apparmor_name.to_owned();
    Ok(())
}

/// A security context's `field` (`seccompProfile`, `appArmorProfile`) as CRI takes it, and its name
/// in the deprecated string field; `unset` when the pod spec names none.
fn profile(security: &Value, field: &str, unset: ProfileType) -> Result<(SecurityProfile, &'static str)> {
    let profile_type = match security[field]["type"].as_str() {
        Some("RuntimeDefault") => ProfileType::RuntimeDefault,
        Some("Unconfined") => ProfileType::Unconfined,
        None => unset,
        Some(other) => bail!("{field} {other} is not translated"),
    };
    let name = match profile_type {
        ProfileType::RuntimeDefault => "runtime/default",
        _ => "unconfined",
    };
    Ok((
        SecurityProfile {
            profile_type: profile_type as i32,
            localhost_ref: String::new(),
        },
        name,
    ))
}

/// The kubelet's resources for a container: CPU shares from the request, the memory limit, and the
/// OOM score a node-critical pod gets.
fn resources(resources: &Value, pod_spec: &Value) -> Result<LinuxContainerResources> {
    let cpu_shares = match resources["requests"]["cpu"].as_str() {
        // MilliCPUToShares: at least 2.
        Some(cpu) => (quantity_milli(cpu)? * 1024 / 1000).max(2),
        None => 2,
    };
    let memory_limit_in_bytes = match resources["limits"]["memory"].as_str() {
        Some(memory) => quantity_bytes(memory)?,
        None => 0,
    };
    // GetContainerOOMScoreAdjust: -997 for node- and cluster-critical pods.
    let critical = matches!(
        pod_spec["priorityClassName"].as_str(),
        Some("system-node-critical" | "system-cluster-critical")
    );
    Ok(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_shares,
        memory_limit_in_bytes,
        oom_score_adj: if critical { -997 } else { 1000 },
        ..Default::default()
    })
}

/// A quantity in bytes: plain, or with a binary (`Ki`..`Gi`) or decimal (`k`..`G`) suffix.
fn quantity_bytes(quantity: &str) -> Result<i64> {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: i64 = number.parse().with_context(|| format!("quantity {quantity}"))?;
    let factor = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("quantity {quantity}: suffix {suffix} is not translated"),
    };
    Ok(number * factor)
}

/// A CPU quantity in millicores (`50m`, `1`).
fn quantity_milli(quantity: &str) -> Result<i64> {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse().with_context(|| format!("quantity {quantity}")),
        None => Ok(quantity
            .parse::<i64>()
            .with_context(|| format!("quantity {quantity}"))?
            * 1000),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn quantities_as_the_kubelet_reads_them() {
        assert_eq!(quantity_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(quantity_bytes("16Mi").unwrap(), 16 << 20);
        assert_eq!(quantity_bytes("1G").unwrap(), 1_000_000_000);
        assert!(quantity_bytes("1.5Gi").is_err());
        assert_eq!(quantity_milli("50m").unwrap(), 50);
        assert_eq!(quantity_milli("2").unwrap(), 2000);
    }

    #[test]
    #[allow(deprecated)]
    fn the_security_context_is_translated_field_by_field() {
        let mut context = crate::cri::api::LinuxContainerSecurityContext::default();
        let security = json!({
            "runAsUser": 0, "privileged": false, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true, "appArmorProfile": {"type": "Unconfined"},
            "seccompProfile": {"type": "RuntimeDefault"},
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]},
        });
        apply_security_context(&mut context, &security).unwrap();
        let capabilities = context.capabilities.unwrap();
        assert_eq!(capabilities.add_capabilities, ["BPF", "NET_ADMIN"]);
        assert_eq!(capabilities.drop_capabilities, ["ALL"]);
        assert_eq!(context.run_as_user.unwrap().value, 0);
        assert!(context.readonly_rootfs && context.no_new_privs && !context.privileged);
        assert_eq!(
            context.seccomp.unwrap().profile_type,
            ProfileType::RuntimeDefault as i32
        );
        assert_eq!(context.seccomp_profile_path, "runtime/default");
        assert_eq!(
            context.apparmor.unwrap().profile_type,
            ProfileType::Unconfined as i32
        );
        assert_eq!(context.apparmor_profile, "unconfined");
    }
}
