//! The chart's DaemonSet run on the simulated node as the kubelet runs it: `helm template`'s agent
//! container (args and env exactly as rendered, downward-API values and `$(VAR)` references filled in
//! by `kubelet`), the real agent binary in a container cgroup of the DaemonSet's pod under kubepods,
//! with the container's mounts (the node's cgroup tree and bpffs), a cgroup namespace of its own, and
//! in-cluster config (ServiceAccount files, `KUBERNETES_SERVICE_HOST`) for the fake API server over
//! HTTPS. Pods get their roles through the AWS CLI with moto as STS; the agent is restarted under
//! load the DaemonSet's way; the uninstall DaemonSet's command removes what the agent left.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use interceptor_tests::{
    agent::{ACCOUNT_ID, Agent},
    cgroup::id_of,
    chart,
    deployed::{ROLE_LIST, aws_cli_caller_arn, body_of, curl, eventually, status_of},
    kernel,
    kube_api::{self, FakeApiServer},
    kube_node::{NODE_NAME, pod_object},
    kubelet::{self, Kubelet},
    lab::{PipedChild, StandIn, run, stop_client},
    moto::Moto,
    privileged, python,
    sim::{self, METADATA_IP, SimNode},
};
use serde_json::Value;

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const ROLE_KEY: &str = "iam.amazonaws.com/role";
/// The README's `helm install`: the chart's defaults name no base ARN, so role names need this one.
const DEFAULT_VALUES: &[&str] = &[
    "--set-string",
    "extraArgs.base-role-arn=arn:aws:iam::123456789012:role/",
];
/// The account of the stand-in's instance profile, which `--auto-discover-base-arn` finds.
const NODE_ACCOUNT_ID: &str = "210987654321";

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test) && python::has_kubectl(test)
}

/// The image's environment: its PATH (the container's mount set-up runs sh and mount before the
/// program).
fn image_env() -> Vec<(String, String)> {
    vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())]
}

/// Everything the agent container's environment holds beyond what the chart renders and the kubelet
/// adds: the image's, and what the simulation needs because the simulated node is not an EC2
/// instance. The rendered env is set after these, so whatever the chart sets wins.
fn simulation_env(moto: &Moto) -> Vec<(String, String)> {
    let simulated = [
        // STS is moto in the node, not the regional endpoint on the internet.
        ("INTERCEPTOR_STS_ENDPOINT", moto.url()),
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

/// The simulated node with the chart's agent DaemonSet on it. Fields drop in order: the agent first,
/// the node last.
struct Cluster {
    agent: Agent,
    agent_container: kubelet::Container,
    /// The running agent's container cgroup.
    agent_cgroup: PathBuf,
    /// The DaemonSet's pod on the node: each agent container is a new cgroup below it.
    agent_pod: sim::Pod,
    kubelet: Kubelet,
    base_env: Vec<(String, String)>,
    moto: Moto,
    api: FakeApiServer,
    stand_in: StandIn,
    node: SimNode,
}

impl Cluster {
    /// Renders the chart with `values`, and starts the stand-in, the API server (in-cluster), moto and
    /// the agent container of the rendered DaemonSet; returns once the agent logged `ready`.
    fn start(mut node: SimNode, values: &[&str]) -> Result<Self> {
        let objects = chart::render(values)?;
        let pod_spec = chart::daemonset(&objects, "interceptor")["spec"]["template"]["spec"].clone();
        let stand_in = StandIn::start(&node)?;
        let api = FakeApiServer::start_in_cluster(&node)?;
        let moto = Moto::start(&node)?;
        let kubelet = Kubelet::new(&node, NODE_NAME, &api, "kube-system")?;
        let agent_container = kubelet.container(&pod_spec, "interceptor")?;
        let agent_pod = node.pod()?;
        let agent_cgroup = agent_pod.container()?;
        let base_env = simulation_env(&moto);
        let agent = start_agent(&node, &agent_container, &agent_cgroup, &base_env)?;
        Ok(Self {
            agent,
            agent_container,
            agent_cgroup,
            agent_pod,
            kubelet,
            base_env,
            moto,
            api,
            stand_in,
            node,
        })
    }

    /// The DaemonSet's restart: the agent is killed (SIGKILL), the kubelet removes its container's
    /// cgroup, and a new container of the same pod starts in a new one. Returns once it is ready.
    fn restart_agent(&mut self) -> Result<()> {
        self.agent.kill()?;
        std::fs::remove_dir(&self.agent_cgroup)
            .with_context(|| format!("cannot remove {}", self.agent_cgroup.display()))?;
        self.agent_cgroup = self.agent_pod.container()?;
        self.agent = start_agent(
            &self.node,
            &self.agent_container,
            &self.agent_cgroup,
            &self.base_env,
        )?;
        Ok(())
    }

    /// Checks that the agent runs as its container does: pinned in the node's bpffs (through its
    /// /sys/fs/bpf), exempting its own container cgroup (found in its cgroup namespace), talking to
    /// the API server at the Service over HTTPS with the ServiceAccount's token.
    fn assert_agent_runs_as_in_its_pod(&self) -> Result<()> {
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
fn log_entry(logs: &[String], message: &str) -> Result<Value> {
    logs.iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|entry| entry["message"] == message)
        .with_context(|| format!("no {message:?} in the agent's log:\n{}", logs.join("\n")))
}

/// The role list as `pod` sees it: `(status, body)`.
async fn role_list(pod: &sim::Pod, container: &Path) -> Result<(u16, String)> {
    let response = curl(pod, container, &[ROLE_LIST]).await?;
    Ok((status_of(&response), body_of(&response).trim().to_owned()))
}

/// The blog post's pod: `aws-cli` in `default`, annotated with a role name (the suffix of the ARN),
/// and a pod beside it without the annotation. Returns what the AWS CLI in the annotated pod is, and
/// what the role list says to the other.
async fn blog_post_pods(cluster: &mut Cluster) -> Result<(String, (u16, String), sim::Pod, PathBuf)> {
    let (annotated, plain) = (cluster.node.pod()?, cluster.node.pod()?);
    cluster.api.apply_pod(pod_object(
        &annotated,
        "default",
        "aws-cli",
        &[(ROLE_KEY, "prefix-reader")],
    ));
    cluster.api.apply_pod(pod_object(&plain, "default", "plain", &[]));
    let (annotated_app, plain_app) = (annotated.container()?, plain.container()?);
    ensure!(
        eventually(|| async {
            role_list(&annotated, &annotated_app)
                .await
                .is_ok_and(|(status, _)| status == 200)
        })
        .await,
        "the annotated pod never got its role list"
    );
    let arn = aws_cli_caller_arn(&annotated, &annotated_app, &cluster.moto.url()).await?;
    let plain_list = role_list(&plain, &plain_app).await?;
    Ok((arn, plain_list, plain, plain_app))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_default_values_the_daemonset_serves_the_annotated_pod_its_role_and_others_nothing()
-> Result<()> {
    if !can_run("DaemonSet, default values") {
        return Ok(());
    }
    let mut cluster = Cluster::start(SimNode::new()?, DEFAULT_VALUES)?;
    cluster.assert_agent_runs_as_in_its_pod()?;
    let (arn, plain_list, _, _) = blog_post_pods(&mut cluster).await?;
    assert_eq!(
        arn,
        format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/prefix-reader/default.aws-cli")
    );
    assert_eq!(plain_list.0, 404, "no role and no default role: {plain_list:?}");
    assert_eq!(
        cluster.stand_in.tcp_accepted(),
        0,
        "{:?}",
        cluster.stand_in.metadata_paths()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_kube2iam_values_the_daemonset_serves_the_annotated_pod_its_role_and_others_the_nodes()
-> Result<()> {
    if !can_run("DaemonSet, kube2iam values") {
        return Ok(());
    }
    let kube2iam = chart::values_file("kube2iam-values.yaml");
    let mut cluster = Cluster::start(SimNode::new()?, &["--values", &kube2iam])?;
    cluster.assert_agent_runs_as_in_its_pod()?;
    // The agent's own discovery (base ARN, default role) asked the node's metadata service; no pod may.
    let discovery = cluster.stand_in.metadata_paths();
    let (arn, plain_list, plain, plain_app) = blog_post_pods(&mut cluster).await?;
    assert_eq!(
        arn,
        format!("arn:aws:sts::{NODE_ACCOUNT_ID}:assumed-role/prefix-reader/default.aws-cli")
    );
    assert_eq!(plain_list, (200, StandIn::NODE_ROLE.to_owned()));
    let plain_arn = aws_cli_caller_arn(&plain, &plain_app, &cluster.moto.url()).await?;
    assert_eq!(
        plain_arn,
        format!(
            "arn:aws:sts::{NODE_ACCOUNT_ID}:assumed-role/{}/default.plain",
            StandIn::NODE_ROLE
        )
    );
    assert_eq!(cluster.stand_in.metadata_paths(), discovery);
    Ok(())
}

/// One attempt of a load client: when it ended (µs since the epoch), and the role and AccessKeyId it
/// got, or nothing for an error.
struct Attempt {
    at_us: u128,
    got: Option<(String, String)>,
    /// What went wrong, for an error.
    error: Option<String>,
}

/// What a load client recorded so far.
#[derive(Default)]
struct Records {
    attempts: Vec<Attempt>,
    /// AccessKeyId -> (SecretAccessKey, Token).
    credentials: BTreeMap<String, (String, String)>,
}

/// `sim-client load` in a pod, asking for credentials without pause until stopped.
struct LoadClient {
    role: &'static str,
    keep_alive: bool,
    records: Arc<Mutex<Records>>,
    stdin: Option<tokio::process::ChildStdin>,
    child: tokio::process::Child,
    reader: tokio::task::JoinHandle<Result<()>>,
}

impl LoadClient {
    fn start(pod: &sim::Pod, container: &Path, role: &'static str, keep_alive: bool) -> Result<Self> {
        let mut command = pod.command(container, SIM_CLIENT)?;
        command.args(["load", &format!("{METADATA_IP}:80")]);
        if keep_alive {
            command.arg("--keep-alive");
        }
        let PipedChild { child, stdin, stdout } = PipedChild::spawn(command)?;
        let records = Arc::new(Mutex::new(Records::default()));
        let reader = tokio::spawn(read_records(stdout, records.clone()));
        Ok(Self {
            role,
            keep_alive,
            records,
            stdin,
            child,
            reader,
        })
    }

    /// Whether an attempt that ended after `since_us` got credentials.
    fn served_since(&self, since_us: u128) -> bool {
        self.records
            .lock()
            .unwrap()
            .attempts
            .iter()
            .any(|attempt| attempt.at_us > since_us && attempt.got.is_some())
    }

    /// Stops the client (its input closes) and returns everything it recorded.
    async fn finish(mut self) -> Result<Records> {
        stop_client(&mut self.child, &mut self.stdin, Duration::from_secs(30)).await?;
        self.reader.await??;
        Ok(std::mem::take(&mut *self.records.lock().unwrap()))
    }
}

async fn read_records(stdout: tokio::process::ChildStdout, records: Arc<Mutex<Records>>) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        let fields: Vec<&str> = line.split(' ').collect();
        let at_us: u128 = fields[0].parse().with_context(|| format!("a record: {line}"))?;
        let mut records = records.lock().unwrap();
        match fields[1..] {
            ["ok", role, key] => records.attempts.push(Attempt {
                at_us,
                got: Some((role.to_owned(), key.to_owned())),
                error: None,
            }),
            ["creds", key, secret, token] => {
                records
                    .credentials
                    .insert(key.to_owned(), (secret.to_owned(), token.to_owned()));
            }
            ["err", ref what @ ..] => records.attempts.push(Attempt {
                at_us,
                got: None,
                error: Some(what.join(" ")),
            }),
            _ => bail!("a record the test does not know: {line}"),
        }
    }
    Ok(())
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_micros()
}

/// When the agent logged `ready`, in µs since the epoch.
fn ready_at_us(agent: &Agent) -> Result<u128> {
    // Agent::start returns when it reads the line, which reaches the log a moment later.
    agent.wait_for_log(r#""message":"ready""#)?;
    let ready = log_entry(&agent.logs(), "ready")?;
    let timestamp = ready["timestamp"]
        .as_str()
        .context("a log entry without a timestamp")?;
    let at = humantime::parse_rfc3339_weak(timestamp).with_context(|| format!("timestamp {timestamp}"))?;
    Ok(at.duration_since(UNIX_EPOCH)?.as_micros())
}

/// The ARN STS (moto) says each of `credentials` belongs to, asked from the node with boto3.
async fn caller_arns(
    node: &SimNode,
    moto: &Moto,
    credentials: &BTreeMap<String, (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let cgroup = node.cgroup("system.slice/verify-credentials.service")?;
    let mut command = node.command(&cgroup, python::tool("python3")?)?;
    let home = tempfile::tempdir()?;
    interceptor_tests::deployed::aws_client_env(&mut command, home.path());
    command.args([
        "-c",
        "import json, sys, boto3\n\
         for key, (secret, token) in json.loads(sys.argv[2]).items():\n\
         \x20   sts = boto3.client('sts', endpoint_url=sys.argv[1], aws_access_key_id=key,\n\
         \x20                      aws_secret_access_key=secret, aws_session_token=token)\n\
         \x20   print(key, sts.get_caller_identity()['Arn'])",
        &moto.url(),
        &serde_json::to_string(credentials)?,
    ]);
    let out = run(command).await?;
    Ok(out
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, arn)| (key.to_owned(), arn.to_owned()))
        .collect())
}

/// Whether every client got credentials after `since_us`, waiting (bounded) for it.
async fn all_served_since(clients: &[LoadClient], since_us: u128) -> bool {
    eventually(|| async { clients.iter().all(|client| client.served_since(since_us)) }).await
}

/// The counts of one phase of the rolling restart.
#[derive(Default)]
struct PhaseCounts {
    requests: usize,
    ok: usize,
    errors: usize,
    /// How many errors of each kind.
    reasons: BTreeMap<String, usize>,
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_under_load_get_only_their_own_roles_through_three_daemonset_restarts() -> Result<()> {
    if !can_run("DaemonSet rolling restart") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    // (role, keep-alive): two clients open a connection per request, two keep theirs.
    let plan = [
        ("app-alpha", false),
        ("app-bravo", true),
        ("app-charlie", false),
        ("app-delta", true),
    ];
    let pods: Vec<(sim::Pod, &str, bool)> = plan
        .iter()
        .map(|&(role, keep_alive)| Ok((node.pod()?, role, keep_alive)))
        .collect::<Result<_>>()?;
    let mut cluster = Cluster::start(node, DEFAULT_VALUES)?;
    let mut clients = Vec::new();
    for (index, (pod, role, keep_alive)) in pods.iter().enumerate() {
        cluster.api.apply_pod(pod_object(
            pod,
            "shop",
            &format!("load-{index}"),
            &[(ROLE_KEY, role)],
        ));
        let container = pod.container()?;
        ensure!(
            eventually(|| async {
                role_list(pod, &container)
                    .await
                    .is_ok_and(|(status, _)| status == 200)
            })
            .await,
            "{role}'s pod never got its role list"
        );
        clients.push(LoadClient::start(pod, &container, role, *keep_alive)?);
    }
    ensure!(
        all_served_since(&clients, 0).await,
        "the clients never got credentials"
    );

    // Phase boundaries: (killed at, ready at) per restart.
    let mut restarts = Vec::new();
    for round in 1..=3 {
        let killed = now_us();
        cluster
            .restart_agent()
            .with_context(|| format!("restart {round}"))?;
        let ready = ready_at_us(&cluster.agent)?;
        restarts.push((killed, ready));
        ensure!(
            all_served_since(&clients, ready).await,
            "restart {round}: a client got no credentials after the agent was ready"
        );
    }
    let stopped = now_us();
    let mut finished = Vec::new();
    for client in clients {
        let (role, keep_alive) = (client.role, client.keep_alive);
        finished.push((role, keep_alive, client.finish().await?));
    }

    // Every answer is the pod's own role's: the role list says so, and STS says whose keys they are.
    let mut key_owner: BTreeMap<String, &str> = BTreeMap::new();
    for (role, _, records) in &finished {
        for attempt in &records.attempts {
            if let Some((listed, key)) = &attempt.got {
                assert_eq!(listed, role, "a pod of {role} was listed another role");
                assert_ne!(key, "AKIANODEEXAMPLE", "a pod got the node's credentials");
                let owner = key_owner.entry(key.clone()).or_insert(role);
                assert_eq!(owner, role, "{key} went to pods of {owner} and {role}");
            }
        }
    }
    let all_credentials: BTreeMap<String, (String, String)> = finished
        .iter()
        .flat_map(|(_, _, records)| records.credentials.clone())
        .collect();
    let arns = caller_arns(&cluster.node, &cluster.moto, &all_credentials).await?;
    for (key, role) in &key_owner {
        let arn = arns
            .get(key)
            .with_context(|| format!("STS did not say whose {key} is"))?;
        assert!(
            arn.starts_with(&format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/")),
            "{key} served to {role}'s pod is {arn}'s"
        );
    }
    assert_eq!(
        cluster.stand_in.tcp_accepted(),
        0,
        "a connection reached the node's metadata service: {:?}",
        cluster.stand_in.metadata_paths()
    );

    // The counts, per phase: up (0), down (each restart until ready), up again; and the longest wait
    // from a `ready` to each client's next credentials.
    // (restarts before, whether that restart's agent was ready): in the order the phases came.
    let phase_of = |at: u128| -> (usize, bool) {
        match restarts.iter().rposition(|&(killed, _)| at >= killed) {
            None => (0, true),
            Some(round) => (round + 1, at >= restarts[round].1),
        }
    };
    let mut phases: BTreeMap<(usize, bool), PhaseCounts> = BTreeMap::new();
    let mut max_gap = Duration::ZERO;
    for (role, keep_alive, records) in &finished {
        for attempt in &records.attempts {
            let counts = phases.entry(phase_of(attempt.at_us)).or_default();
            counts.requests += 1;
            counts.ok += usize::from(attempt.got.is_some());
            if let Some(error) = &attempt.error {
                counts.errors += 1;
                *counts.reasons.entry(error.clone()).or_default() += 1;
            }
        }
        for (round, &(_, ready)) in restarts.iter().enumerate() {
            let first = records
                .attempts
                .iter()
                .find(|attempt| attempt.at_us > ready && attempt.got.is_some())
                .with_context(|| format!("{role}: nothing after restart {}", round + 1))?;
            let gap = Duration::from_micros(u64::try_from(first.at_us - ready)?);
            println!(
                "restart {}: {role} ({}) got credentials {gap:?} after ready",
                round + 1,
                if *keep_alive {
                    "keep-alive"
                } else {
                    "new connections"
                }
            );
            max_gap = max_gap.max(gap);
        }
    }
    for ((round, up), counts) in &phases {
        let phase = match (round, up) {
            (_, true) => format!("up {round}"),
            (_, false) => {
                let (killed, ready) = restarts[round - 1];
                format!(
                    "down {round} ({:.2} s from kill to ready)",
                    (ready - killed) as f64 / 1e6
                )
            }
        };
        println!(
            "{phase}: {} requests, {} ok, {} errors {:?}",
            counts.requests, counts.ok, counts.errors, counts.reasons
        );
    }
    println!(
        "{} distinct credentials, all verified with STS; max gap after ready {max_gap:?}; {:.1} s under load",
        key_owner.len(),
        (stopped - restarts[0].0) as f64 / 1e6
    );
    assert!(
        max_gap <= Duration::from_secs(2),
        "credentials flowed again only {max_gap:?} after ready"
    );
    Ok(())
}

/// The programs attached at `root`, one count per attach type the agent uses.
fn programs_on(root: &Path) -> Result<Vec<usize>> {
    kernel::AGENT_ATTACH_TYPES
        .iter()
        .map(|&attach_type| Ok(kernel::attached_programs(root, attach_type)?.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_uninstall_daemonsets_command_detaches_and_unpins_what_a_killed_agent_left() -> Result<()> {
    if !can_run("uninstall DaemonSet") {
        return Ok(());
    }
    let mut cluster = Cluster::start(SimNode::new()?, DEFAULT_VALUES)?;
    let root = cluster.node.kubepods().to_path_buf();
    assert_eq!(programs_on(&root)?, [1; 6]);
    cluster.agent.kill()?;
    assert_eq!(programs_on(&root)?, [1; 6], "the programs outlive the agent");

    let objects = chart::render(&[DEFAULT_VALUES, &["--set", "uninstall.enabled=true"]].concat())?;
    let pod_spec = &chart::daemonset(&objects, "interceptor-uninstall")["spec"]["template"]["spec"];
    let uninstall = cluster.kubelet.container(pod_spec, "uninstall")?;
    let pod = cluster.node.pod()?;
    let command = uninstall.command(&cluster.node, &pod.container()?, &Agent::binary()?, &image_env())?;
    let said = run(command).await?;
    assert!(said.contains("detached 6 programs"), "{said}");

    assert_eq!(programs_on(&root)?, [0; 6], "programs still attached");
    let bpffs_dir = cluster.node.bpffs_dir();
    let left: Vec<_> = match std::fs::read_dir(&bpffs_dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err.into()),
    };
    assert!(left.is_empty(), "still pinned: {left:?}");
    Ok(())
}
