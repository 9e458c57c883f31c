//! `sudo cargo xtask bench`: the agent measured on a simulated node against baselines from the same run,
//! printed as one table and written as JSON.
//!
//! 1. Cached credentials through the eBPF redirect, keep-alive and a new connection per request, 1 and
//!    16 clients (wrk in a pod's namespace and container cgroup), beside nginx returning the same bytes
//!    directly (the ceiling) and behind an iptables DNAT rule in the node's PREROUTING chain (the
//!    kube2iam path; on a node of its own with no programs attached, so its conntrack does not tax the
//!    other paths).
//! 2. BPF cost: run time per connection of the agent's programs, for redirected connections and for
//!    unrelated ones (from a pod to a listener on the node outside the workload cgroups, so only the
//!    pod's end runs the programs); connect() there with the programs attached and detached.
//! 3. Cold fan-in: concurrent first requests from many callers over many roles; STS calls at moto.
//! 4. The agent's memory with 0, 110 and 1,000 pods known and 100 cached sessions, idle and under load.
//! 5. Flood: a quiet pod's latency alone and while another pod floods the agent (`--only flood` runs
//!    this section alone).
//!
//! `--soak MINUTES` runs none of these but the soak: a steady mix for that long, the agent's memory and
//! descriptors sampled every 10 s, and whether they stay flat.
//!
//! The agent learns its pods as on a real node: from the Kubernetes API (the tests' fake API server in
//! the node), where every caller is a Pod object with a role annotation, beside filler pods with no
//! cgroup for the memory measurement.
//!
//! Every figure is the median of `--runs` runs with min and max. Nothing here is asserted: it measures.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use interceptor_tests::{
    bench::{
        Measure, Route,
        agent::{BenchAgent, PodLimits},
        bpf_stats::{ProgramStats, StatsEnabled},
        connect::{ConnectCost, UnrelatedListener, attached_vs_detached},
        flood::{self, FloodReport},
        micros,
        nginx::Nginx,
        output_field,
        process::{Memory, cpu_time},
        soak::{self, SoakReport},
        spread::Spread,
        wrk::{Connections, Load, LoadResult},
    },
    deployed::{body_of, curl, status_of},
    kube_api::FakeApiServer,
    kube_node::{NODE_NAME, namespace_object, pod_object},
    lab::{StandIn, run},
    moto::Moto,
    privileged,
    sim::{METADATA_IP, NODE_IP, Pod, SimNode},
};
use k8s_openapi::api::core::v1::Pod as PodObject;
use serde::Serialize;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmarks of the agent on a simulated node (as root)")]
struct Options {
    /// Runs of each measurement; the table shows their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of each load run (at most 50).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    seconds: u64,
    /// Where to write the results as JSON.
    #[arg(long)]
    json: PathBuf,
    /// Instead of the benchmarks: record the agent with `perf record` into this file while it serves
    /// 16 keep-alive clients for `--seconds`.
    #[arg(long, value_name = "FILE")]
    perf_record: Option<PathBuf>,
    /// Run only this section of the benchmarks.
    #[arg(long, value_enum, conflicts_with = "perf_record")]
    only: Option<Section>,
    /// Instead of the benchmarks: the soak, a steady mix of callers for this many minutes (at least 2;
    /// a third of it, at least the first minute, is warm-up).
    #[arg(long, value_name = "MINUTES", value_parser = clap::value_parser!(u64).range(2..),
          conflicts_with_all = ["perf_record", "only"])]
    soak: Option<u64>,
}

/// A section `--only` runs.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// 5: a quiet pod alone and while another floods the agent.
    Flood,
}

/// The credentials path below the metadata address; the role's name follows it.
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";
/// Where nginx listens on each node.
const NGINX_PORT: u16 = 8088;
/// Callers with a role each: the fan-in asks as the first [`FAN_IN_ROLES`], the memory measurement
/// caches a session for every one.
const CALLERS: usize = 100;
const FAN_IN_ROLES: usize = 50;
const FAN_IN_PER_ROLE: usize = 10;
const KNOWN_PODS: [usize; 3] = [0, 110, 1000];
/// The annotation that gives a pod its role (kube2iam's).
const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// Where the callers' Pod objects are, and the fillers' (spread over a few, as a node's pods are).
const CALLER_NAMESPACE: &str = "bench";
const FILLER_NAMESPACES: [&str; 4] = ["shop", "payments", "batch", "monitoring"];
const CLIENT_COUNTS: [usize; 2] = [1, 16];
const CONNECTIONS: [Connections; 2] = [Connections::KeepAlive, Connections::NewPerRequest];
/// Unrelated connects timed for the BPF cost, and the rounds and connects of connect() attached vs
/// detached (odd, so the median is one of the rounds).
const UNRELATED_CONNECTS: usize = 20_000;
const CONNECT_ROUNDS: usize = 7;
const CONNECTS_PER_ROUND: usize = 2000;

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    if !privileged::can_run("bench") || !privileged::has_python_tools("bench") {
        return ExitCode::FAILURE;
    }
    match bench(&options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A pod with one container whose workload has a role of its own.
struct Caller {
    pod: Pod,
    container: PathBuf,
    /// Its Pod object's name, in [`CALLER_NAMESPACE`].
    name: String,
    role: String,
}

impl Caller {
    /// Its Pod object: the UID of its cgroup's pod, so the agent finds it from a connection's cgroup,
    /// and its role annotated.
    fn object(&self) -> PodObject {
        pod_object(
            &self.pod,
            CALLER_NAMESPACE,
            &self.name,
            &[(ROLE_ANNOTATION, &self.role)],
        )
    }
}

/// The node the agent runs on, with everything around it. Fields drop in order: nginx and moto, then
/// the API server, the stand-in, the kubeconfig, the callers' pods, the node.
struct AgentNode {
    nginx: Option<Nginx>,
    moto: Moto,
    api: FakeApiServer,
    _stand_in: StandIn,
    /// Holds the kubeconfig that `source_flags` name.
    _kubeconfig_dir: tempfile::TempDir,
    /// The agent's workload source: this node's pods from the API server.
    source_flags: Vec<OsString>,
    agent_cgroup: PathBuf,
    callers: Vec<Caller>,
    node: SimNode,
}

impl AgentNode {
    async fn start() -> Result<Self> {
        let mut node = SimNode::new()?;
        let mut callers: Vec<Caller> = Vec::with_capacity(CALLERS);
        for index in 0..CALLERS {
            // All in one pod network, as hostNetwork pods are: 100 namespaces would measure setup.
            let pod = match callers.first() {
                Some(first) => node.pod_sharing(&first.pod)?,
                None => node.pod()?,
            };
            let container = pod.container()?;
            callers.push(Caller {
                pod,
                container,
                name: format!("caller-{index:03}"),
                role: format!("role-{index:03}"),
            });
        }
        allow_time_wait_reuse(&callers[0].pod, &callers[0].container).await?;
        let api = FakeApiServer::start(&node)?;
        let kubeconfig_dir = tempfile::tempdir()?;
        let kubeconfig = kubeconfig_dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Ok(Self {
            nginx: None,
            moto: Moto::start(&node)?,
            api,
            _stand_in: StandIn::start(&node)?,
            _kubeconfig_dir: kubeconfig_dir,
            source_flags: vec![
                "--kubeconfig".into(),
                kubeconfig.into(),
                "--node".into(),
                NODE_NAME.into(),
            ],
            agent_cgroup: node.cgroup("system.slice/interceptor.service")?,
            callers,
            node,
        })
    }

    /// Starts an agent that finds the first `callers` callers and `known - callers` fillers on this
    /// node in the API server, and nothing else.
    fn start_agent(&self, callers: usize, known: usize) -> Result<BenchAgent> {
        self.start_agent_limited(callers, known, PodLimits::OutOfReach)
    }

    /// [`Self::start_agent`], with `limits`.
    fn start_agent_limited(&self, callers: usize, known: usize, limits: PodLimits) -> Result<BenchAgent> {
        self.set_known_pods(callers, known);
        BenchAgent::start(
            &self.node,
            &self.agent_cgroup,
            &self.moto.url(),
            &self.source_flags,
            limits,
        )
    }

    /// Makes the Pod objects in the API server the first `callers` callers' and `known - callers`
    /// fillers', in namespaces emptied first (deleting a namespace deletes its pods).
    fn set_known_pods(&self, callers: usize, known: usize) {
        for namespace in std::iter::once(CALLER_NAMESPACE).chain(FILLER_NAMESPACES) {
            self.api.delete_namespace(namespace);
            self.api.apply_namespace(namespace_object(namespace, &[]));
        }
        for caller in &self.callers[..callers] {
            self.api.apply_pod(caller.object());
        }
        for index in 0..known - callers {
            self.api.apply_pod(self.filler_object(index));
        }
    }

    /// A Pod object on this node with a role of its own and no cgroup: it only adds to what the agent
    /// knows. Without a UID, the API server gives it a random one, as it does every new pod.
    fn filler_object(&self, index: usize) -> PodObject {
        let namespace = FILLER_NAMESPACES[index % FILLER_NAMESPACES.len()];
        let name = format!("filler-{index:04}");
        let mut object = pod_object(&self.caller().pod, namespace, &name, &[(ROLE_ANNOTATION, &name)]);
        object.metadata.uid = None;
        object
    }

    fn caller(&self) -> &Caller {
        &self.callers[0]
    }

    /// The node's nginx; started once the agent's reply is known, before any load.
    fn nginx(&self) -> &Nginx {
        self.nginx.as_ref().expect("nginx starts before the loads")
    }
}

/// A node with no programs where 169.254.169.254:80 is DNATed to nginx, as kube2iam sets it up.
struct DnatNode {
    _nginx: Nginx,
    pod: Pod,
    container: PathBuf,
    _node: SimNode,
}

impl DnatNode {
    async fn start(body: &str) -> Result<Self> {
        let mut node = SimNode::new()?;
        let pod = node.pod()?;
        let container = pod.container()?;
        allow_time_wait_reuse(&pod, &container).await?;
        let nginx = Nginx::start(&node, SocketAddrV4::new(NODE_IP, NGINX_PORT), body)?;
        // Lives and dies with the node's namespace.
        let mut dnat = node.command(&node.cgroup("system.slice/iptables.service")?, "iptables")?;
        dnat.args(["-t", "nat", "-A", "PREROUTING", "-p", "tcp"])
            .args(["-d", &format!("{METADATA_IP}/32"), "--dport", "80"])
            .args([
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{NODE_IP}:{NGINX_PORT}"),
            ]);
        run(dnat).await.context("cannot add the DNAT rule")?;
        Ok(Self {
            _nginx: nginx,
            pod,
            container,
            _node: node,
        })
    }
}

/// Sockets a client closed wait in TIME_WAIT; past ~14k of them new connections crawl unless the
/// client's namespace may reuse them.
async fn allow_time_wait_reuse(pod: &Pod, container: &Path) -> Result<()> {
    let mut sysctl = pod.command(container, "sysctl")?;
    sysctl.args(["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    run(sysctl).await.map(drop)
}

/// What a load runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    /// The agent through the eBPF redirect.
    Agent,
    /// nginx at the node's address: the ceiling.
    NginxDirect,
    /// nginx behind the DNAT rule.
    NginxDnat,
}

const TARGETS: [Target; 3] = [Target::Agent, Target::NginxDirect, Target::NginxDnat];

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Agent => "agent via redirect",
            Target::NginxDirect => "nginx direct (ceiling)",
            Target::NginxDnat => "nginx via DNAT",
        }
    }
}

fn route<'a>(target: Target, agent_node: &'a AgentNode, dnat: &'a DnatNode, path: &str) -> Route<'a> {
    let caller = agent_node.caller();
    match target {
        Target::Agent => Route {
            url: format!("http://{METADATA_IP}{path}"),
            pod: &caller.pod,
            cgroup: &caller.container,
        },
        Target::NginxDirect => Route {
            url: format!("http://{NODE_IP}:{NGINX_PORT}{path}"),
            pod: &caller.pod,
            cgroup: &caller.container,
        },
        Target::NginxDnat => Route {
            url: format!("http://{METADATA_IP}{path}"),
            pod: &dnat.pod,
            cgroup: &dnat.container,
        },
    }
}

type LoadKey = (Connections, usize, Target);

async fn bench(options: &Options) -> Result<()> {
    let sim_client = sibling_binary("sim-client")?;
    let duration = Duration::from_secs(options.seconds);
    let mut agent_node = AgentNode::start().await?;
    if let Some(minutes) = options.soak {
        let soak = soak_section(&agent_node, Duration::from_secs(minutes * 60)).await?;
        print_machine();
        soak.print();
        return write_json(
            &options.json,
            json!({ "machine": machine(), "soak": soak.to_json() }),
        );
    }
    if options.only == Some(Section::Flood) {
        let flood = flood_section(&agent_node, options.runs, duration).await?;
        print_machine();
        println!("median [min-max] of {} runs; ratios of medians", options.runs);
        flood.print();
        return write_json(
            &options.json,
            json!({ "machine": machine(), "flood": flood.to_json() }),
        );
    }

    // 1. The agent knows every caller and has cached the first one's credentials.
    let agent = agent_node.start_agent(CALLERS, CALLERS)?;
    let caller = agent_node.caller();
    let path = format!("{CREDENTIALS_PATH}{}", caller.role);
    let url = format!("http://{METADATA_IP}{path}");
    let response = curl(&caller.pod, &caller.container, &[&url]).await?;
    ensure!(status_of(&response) == 200, "the agent refused {url}: {response}");
    let body = body_of(&response).to_owned();
    agent_node.nginx = Some(Nginx::start(
        &agent_node.node,
        SocketAddrV4::new(NODE_IP, NGINX_PORT),
        &body,
    )?);
    let dnat = DnatNode::start(&body).await?;
    for target in TARGETS {
        let route = route(target, &agent_node, &dnat, &path);
        let response = curl(route.pod, route.cgroup, &[&route.url]).await?;
        ensure!(
            body_of(&response) == body,
            "{} answered something else: {response}",
            target.label()
        );
    }

    if let Some(perf_data) = &options.perf_record {
        return perf_record(
            &agent,
            &route(Target::Agent, &agent_node, &dnat, &path),
            duration,
            perf_data,
        )
        .await;
    }

    let mut loads: BTreeMap<LoadKey, Vec<LoadResult>> = BTreeMap::new();
    // CPU time (user and kernel) per request of the agent and of nginx direct, by load.
    let mut cpu: BTreeMap<LoadKey, Vec<f64>> = BTreeMap::new();
    for run_index in 0..options.runs {
        for connections in CONNECTIONS {
            for clients in CLIENT_COUNTS {
                // Targets interleaved, so a drift of the machine during the run touches all alike.
                for target in TARGETS {
                    let route = route(target, &agent_node, &dnat, &path);
                    let load = Load {
                        url: &route.url,
                        clients,
                        connections,
                        duration,
                    };
                    let server_cpu = || -> Result<Option<Duration>> {
                        match target {
                            Target::Agent => cpu_time(agent.pid()).map(Some),
                            Target::NginxDirect => agent_node.nginx().cpu_time().map(Some),
                            Target::NginxDnat => Ok(None),
                        }
                    };
                    let cpu_before = server_cpu()?;
                    let result = load.run(route.pod, route.cgroup).await?;
                    if let (Some(before), Some(after)) = (cpu_before, server_cpu()?) {
                        cpu.entry((connections, clients, target))
                            .or_default()
                            .push((after - before).as_secs_f64() * 1e6 / result.requests as f64);
                    }
                    eprintln!(
                        "bench: run {} {} {clients} client(s) {}: {:.0} req/s p50 {:.0} us p99 {:.0} us",
                        run_index + 1,
                        connections.label(),
                        target.label(),
                        result.requests_per_sec,
                        result.p50_us,
                        result.p99_us
                    );
                    loads
                        .entry((connections, clients, target))
                        .or_default()
                        .push(result);
                }
            }
        }
    }

    // 2. BPF cost.
    let bpf = bpf_cost(&agent, &agent_node, &sim_client, &url, duration, options.runs).await?;
    drop(agent);
    let connect = attached_vs_detached(&sim_client, CONNECT_ROUNDS, CONNECTS_PER_ROUND).await?;

    // 3. Cold fan-in, a new agent (so an empty cache) each run.
    let mut fan_ins = Vec::new();
    for _ in 0..options.runs {
        fan_ins.push(fan_in(&agent_node, &sim_client).await?);
    }

    // 4. Memory.
    let mut memory = Vec::new();
    for known in KNOWN_PODS {
        memory.push(memory_with(&agent_node, &sim_client, known, &path, duration).await?);
    }

    // 5. Flood.
    let flood = flood_section(&agent_node, options.runs, duration).await?;

    let report = Report {
        runs: options.runs,
        loads,
        cpu,
        bpf,
        connect,
        fan_ins,
        memory,
        flood,
    };
    report.print();
    write_json(&options.json, report.to_json(options.seconds))
}

fn write_json(path: &Path, value: serde_json::Value) -> Result<()> {
    let json = serde_json::to_string_pretty(&value)?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

/// A caller asking for its role's credentials.
fn credentials_route(caller: &Caller) -> Route<'_> {
    Route {
        url: format!("http://{METADATA_IP}{CREDENTIALS_PATH}{}", caller.role),
        pod: &caller.pod,
        cgroup: &caller.container,
    }
}

/// Asks once as `route`'s client and fails unless the agent answers 200 (which caches the session).
async fn expect_ok(route: &Route<'_>) -> Result<()> {
    let response = curl(route.pod, route.cgroup, &[&route.url]).await?;
    ensure!(
        status_of(&response) == 200,
        "the agent refused {}: {response}",
        route.url
    );
    Ok(())
}

/// The flood (5), on a fresh agent with the default per-pod limits that knows every caller: the first
/// is the quiet pod, the second floods. Both have their sessions cached first, so the flood measures
/// answering, not STS.
async fn flood_section(agent_node: &AgentNode, runs: usize, duration: Duration) -> Result<FloodReport> {
    let _agent = agent_node.start_agent_limited(CALLERS, CALLERS, PodLimits::Defaults)?;
    let quiet = credentials_route(&agent_node.callers[0]);
    let flooder = credentials_route(&agent_node.callers[1]);
    for route in [&quiet, &flooder] {
        expect_ok(route).await?;
    }
    flood::measure(&quiet, &flooder, runs, duration).await
}

/// The soak, on a fresh agent that knows every caller, the first of them in the mix.
async fn soak_section(agent_node: &AgentNode, length: Duration) -> Result<SoakReport> {
    let agent = agent_node.start_agent(CALLERS, CALLERS)?;
    let pods: Vec<Route> = agent_node
        .callers
        .iter()
        .take(soak::pods_needed())
        .map(credentials_route)
        .collect();
    soak::soak(&agent_node.node, agent.pid(), &pods, length).await
}

/// A binary built beside this one (`sim-client`).
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable without a directory")?.join(name);
    ensure!(
        path.exists(),
        "{} is missing: build it beside {}",
        path.display(),
        exe.display()
    );
    Ok(path)
}

/// The agent's programs' run time per connection.
#[derive(Serialize)]
struct BpfCost {
    /// Total of all programs per redirected connection (a credentials request on a new connection),
    /// one figure per run.
    redirected_ns: Vec<f64>,
    /// Total of all programs per unrelated connection (a pod's connect to a listener on the node outside
    /// the workload cgroups, whose end runs none of them), per run.
    unrelated_ns: Vec<f64>,
    /// Per program, over the last run: redirected, then unrelated.
    redirected_programs: Vec<ProgramStats>,
    unrelated_programs: Vec<ProgramStats>,
}

async fn bpf_cost(
    agent: &BenchAgent,
    agent_node: &AgentNode,
    sim_client: &Path,
    url: &str,
    duration: Duration,
    runs: usize,
) -> Result<BpfCost> {
    let caller = agent_node.caller();
    let listener = UnrelatedListener::start(&agent_node.node)?;
    let _stats = StatsEnabled::enable()?;
    let mut cost = BpfCost {
        redirected_ns: Vec::new(),
        unrelated_ns: Vec::new(),
        redirected_programs: Vec::new(),
        unrelated_programs: Vec::new(),
    };
    for _ in 0..runs {
        let before = ProgramStats::of_process(agent.pid())?;
        let load = Load {
            url,
            clients: 1,
            connections: Connections::NewPerRequest,
            duration,
        };
        let result = load.run(&caller.pod, &caller.container).await?;
        let redirected = ProgramStats::since(&ProgramStats::of_process(agent.pid())?, &before);
        cost.redirected_ns
            .push(total_ns(&redirected) / result.requests as f64);
        cost.redirected_programs = redirected;

        let before = ProgramStats::of_process(agent.pid())?;
        let mut client = caller.pod.command(&caller.container, sim_client)?;
        client
            .args(["connect-loop", "--to", &listener.addr().to_string()])
            .args(["--count", &UNRELATED_CONNECTS.to_string()]);
        run(client).await?;
        let unrelated = ProgramStats::since(&ProgramStats::of_process(agent.pid())?, &before);
        cost.unrelated_ns
            .push(total_ns(&unrelated) / UNRELATED_CONNECTS as f64);
        cost.unrelated_programs = unrelated;
    }
    Ok(cost)
}

/// The run time of all `programs` together, in ns.
fn total_ns(programs: &[ProgramStats]) -> f64 {
    programs.iter().map(|program| program.run_time_ns).sum::<u64>() as f64
}

/// One cold burst: what the callers saw and how many AssumeRole calls reached moto.
#[derive(Serialize)]
struct FanIn {
    ok: u64,
    failed: u64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    sts_calls: usize,
}

async fn fan_in(agent_node: &AgentNode, sim_client: &Path) -> Result<FanIn> {
    let _agent = agent_node.start_agent(FAN_IN_ROLES, FAN_IN_ROLES)?;
    let sts_before = agent_node.moto.assume_role_calls()?;
    let output = burst(agent_node, sim_client, FAN_IN_ROLES, FAN_IN_PER_ROLE).await?;
    let field = |name: &str| output_field(&output, name);
    Ok(FanIn {
        ok: field("ok")? as u64,
        failed: field("failed")? as u64,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        max_us: field("max_us")?,
        sts_calls: agent_node.moto.assume_role_calls()? - sts_before,
    })
}

/// `per_caller` concurrent first requests as each of the first `callers` callers, all released at
/// once: sim-client's `fan-in` output.
async fn burst(
    agent_node: &AgentNode,
    sim_client: &Path,
    callers: usize,
    per_caller: usize,
) -> Result<String> {
    let first = agent_node.caller();
    let mut client = first.pod.command(&first.container, sim_client)?;
    client
        .args(["fan-in", &format!("{METADATA_IP}:80")])
        .args(["--path-prefix", CREDENTIALS_PATH])
        .args(["--per-caller", &per_caller.to_string()])
        .args(
            agent_node.callers[..callers]
                .iter()
                .map(|caller| format!("{}={}", caller.container.display(), caller.role)),
        );
    run(client).await
}

/// The agent's memory with `known` pods known (Pod objects on its node: the callers first, then
/// fillers): just started, with a session cached for every caller (when it knows them), and under the
/// 16-client keep-alive load (the median of readings during it).
#[derive(Serialize)]
struct MemoryRun {
    known_pods: usize,
    cached_sessions: usize,
    started: Memory,
    idle: Memory,
    under_load: Option<Memory>,
}

async fn memory_with(
    agent_node: &AgentNode,
    sim_client: &Path,
    known: usize,
    path: &str,
    duration: Duration,
) -> Result<MemoryRun> {
    let callers = known.min(CALLERS);
    let agent = agent_node.start_agent(callers, known)?;
    let started = Memory::of(agent.pid())?;
    if callers == 0 {
        // Nothing to serve: every request would be refused, which is not the load of (1).
        return Ok(MemoryRun {
            known_pods: known,
            cached_sessions: 0,
            started,
            idle: started,
            under_load: None,
        });
    }
    let output = burst(agent_node, sim_client, callers, 1).await?;
    ensure!(
        output.contains("failed=0"),
        "warming the sessions failed: {output}"
    );
    let idle = Memory::of(agent.pid())?;
    let caller = agent_node.caller();
    let url = format!("http://{METADATA_IP}{path}");
    let load = Load {
        url: &url,
        clients: 16,
        connections: Connections::KeepAlive,
        duration,
    };
    Ok(MemoryRun {
        known_pods: known,
        cached_sessions: callers,
        started,
        idle,
        under_load: Some(memory_under(&load, &caller.pod, &caller.container, agent.pid()).await?),
    })
}

/// Runs `load` while reading `pid`'s memory every 200 ms: the median VmRSS of the readings, and the
/// peak from the start of the load to its end.
async fn memory_under(load: &Load<'_>, pod: &Pod, cgroup: &Path, pid: u32) -> Result<Memory> {
    Memory::reset_peak(pid)?;
    let period = Duration::from_millis(200);
    let mut readings = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let running = load.run(pod, cgroup);
    tokio::pin!(running);
    let mut resident = Vec::new();
    loop {
        tokio::select! {
            result = &mut running => {
                result?;
                break;
            }
            _ = readings.tick() => resident.push(Memory::of(pid)?.rss_kib as f64),
        }
    }
    ensure!(!resident.is_empty(), "the load ended before the first reading");
    Ok(Memory {
        rss_kib: Spread::of(&resident).median as u64,
        peak_kib: Memory::of(pid)?.peak_kib,
    })
}

/// Records the agent with perf (DWARF call graphs: a release build keeps no frame pointers) while 16
/// keep-alive clients load it.
async fn perf_record(
    agent: &BenchAgent,
    route: &Route<'_>,
    duration: Duration,
    perf_data: &Path,
) -> Result<()> {
    let mut perf = tokio::process::Command::new("perf");
    perf.args(["record", "--call-graph", "dwarf,16384", "-F", "499", "-o"])
        .arg(perf_data)
        .args(["-p", &agent.pid().to_string(), "--", "sleep"])
        .arg(duration.as_secs().to_string())
        .kill_on_drop(true);
    let recording = perf.spawn().context("cannot start perf (package linux-perf)")?;
    let load = Load {
        url: &route.url,
        clients: 16,
        connections: Connections::KeepAlive,
        duration,
    };
    let result = load.run(route.pod, route.cgroup).await?;
    let status = recording.wait_with_output().await?.status;
    ensure!(status.success(), "perf record failed: {status}");
    println!(
        "recorded {} requests ({:.0} req/s) into {}",
        result.requests,
        result.requests_per_sec,
        perf_data.display()
    );
    Ok(())
}

struct Report {
    runs: usize,
    loads: BTreeMap<LoadKey, Vec<LoadResult>>,
    cpu: BTreeMap<LoadKey, Vec<f64>>,
    bpf: BpfCost,
    connect: ConnectCost,
    fan_ins: Vec<FanIn>,
    memory: Vec<MemoryRun>,
    flood: FloodReport,
}

impl Report {
    fn spread(&self, key: LoadKey, of: impl Fn(&LoadResult) -> f64) -> Spread {
        let values: Vec<f64> = self.loads[&key].iter().map(of).collect();
        Spread::of(&values)
    }

    fn print(&self) {
        print_machine();
        println!("median [min-max] of {} runs; ratios of medians", self.runs);
        println!(
            "\n{:<36} {:<26} {:<26} {:<26} {:>9} {:>9}",
            "cached credentials",
            Target::Agent.label(),
            Target::NginxDirect.label(),
            Target::NginxDnat.label(),
            "agent/top",
            "agent/dnat"
        );
        for connections in CONNECTIONS {
            for clients in CLIENT_COUNTS {
                for measure in [Measure::REQUESTS_PER_SEC, Measure::P50, Measure::P99] {
                    let spreads =
                        TARGETS.map(|target| self.spread((connections, clients, target), measure.of));
                    println!(
                        "{:<36} {:<26} {:<26} {:<26} {:>9.2} {:>9.2}",
                        format!("{}, {clients} client(s) {}", connections.label(), measure.name),
                        measure.cell(spreads[0]),
                        measure.cell(spreads[1]),
                        measure.cell(spreads[2]),
                        spreads[0].median / spreads[1].median,
                        spreads[0].median / spreads[2].median,
                    );
                }
            }
        }
        for ((connections, clients, target), per_request) in &self.cpu {
            let spread = Spread::of(per_request);
            println!(
                "CPU per request, {}, {clients} client(s), {}: {:.1} us [{:.1}-{:.1}]",
                connections.label(),
                target.label(),
                spread.median,
                spread.min,
                spread.max
            );
        }
        let socket_errors: u64 = self.loads.values().flatten().map(|r| r.socket_errors).sum();
        println!("socket errors over all load runs: {socket_errors}");

        println!("\nBPF run time of the agent's programs (bpf stats)");
        let redirected = Spread::of(&self.bpf.redirected_ns);
        let unrelated = Spread::of(&self.bpf.unrelated_ns);
        println!(
            "  per redirected connection: {:.0} ns [{:.0}-{:.0}]",
            redirected.median, redirected.min, redirected.max
        );
        println!(
            "  per unrelated connection:  {:.0} ns [{:.0}-{:.0}]",
            unrelated.median, unrelated.min, unrelated.max
        );
        for (kind, programs) in [
            ("redirected", &self.bpf.redirected_programs),
            ("unrelated", &self.bpf.unrelated_programs),
        ] {
            let per_program: Vec<String> = programs
                .iter()
                .filter(|program| program.run_count > 0)
                .map(|program| {
                    format!(
                        "{} {} runs x {:.0} ns",
                        program.name,
                        program.run_count,
                        program.ns_per_run()
                    )
                })
                .collect();
            println!("  last {kind} run: {}", per_program.join(", "));
        }
        println!(
            "  connect() to an unrelated listener: detached {:.1} us, attached {:.1} us, ratio {:.3} \
             (median of {} rounds x {})",
            self.connect.detached_us,
            self.connect.attached_us,
            self.connect.ratio(),
            self.connect.rounds,
            self.connect.connects_per_round
        );

        println!(
            "\ncold fan-in: {} first requests over {FAN_IN_ROLES} roles",
            FAN_IN_ROLES * FAN_IN_PER_ROLE
        );
        for (index, run) in self.fan_ins.iter().enumerate() {
            println!(
                "  run {}: STS calls {}, ok {}, failed {}, p50 {}, p99 {}, max {}",
                index + 1,
                run.sts_calls,
                run.ok,
                run.failed,
                micros(run.p50_us),
                micros(run.p99_us),
                micros(run.max_us)
            );
        }

        println!(
            "\nagent memory (MiB): VmRSS, and in brackets the peak (VmHWM): since the start for started and \
             idle (the start parses the kernel's BTF), since the load began for under load"
        );
        println!(
            "  {:>10} {:>8} {:>16} {:>16} {:>16}",
            "pods known", "sessions", "started", "idle", "under load"
        );
        let mib = |memory: Memory| {
            format!(
                "{:.1} [{:.1}]",
                memory.rss_kib as f64 / 1024.0,
                memory.peak_kib as f64 / 1024.0
            )
        };
        for run in &self.memory {
            println!(
                "  {:>10} {:>8} {:>16} {:>16} {:>16}",
                run.known_pods,
                run.cached_sessions,
                mib(run.started),
                mib(run.idle),
                run.under_load.map_or_else(|| "-".to_owned(), mib)
            );
        }
        self.flood.print();
    }

    fn to_json(&self, seconds_per_load: u64) -> serde_json::Value {
        let loads: Vec<serde_json::Value> = self
            .loads
            .iter()
            .map(|(&(connections, clients, target), runs)| {
                let key = (connections, clients, target);
                json!({
                    "connections": connections,
                    "clients": clients,
                    "target": target,
                    "requests_per_sec": self.spread(key, |r| r.requests_per_sec),
                    "p50_us": self.spread(key, |r| r.p50_us),
                    "p99_us": self.spread(key, |r| r.p99_us),
                    "runs": runs,
                })
            })
            .collect();
        let cpu: Vec<serde_json::Value> = self
            .cpu
            .iter()
            .map(|((connections, clients, target), per_request)| {
                json!({
                    "connections": connections,
                    "clients": clients,
                    "target": target,
                    "cpu_us_per_request": Spread::of(per_request),
                    "runs": per_request,
                })
            })
            .collect();
        json!({
            "machine": machine(),
            "runs": self.runs,
            "seconds_per_load": seconds_per_load,
            "loads": loads,
            "cpu": cpu,
            "bpf": self.bpf,
            "connect": self.connect,
            "fan_in": { "roles": FAN_IN_ROLES, "per_role": FAN_IN_PER_ROLE, "runs": self.fan_ins },
            "memory": self.memory,
            "flood": self.flood.to_json(),
        })
    }
}

fn print_machine() {
    println!("\nmachine: {} cores, kernel {}", cores(), kernel_release());
}

fn machine() -> serde_json::Value {
    json!({ "cores": cores(), "kernel": kernel_release() })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".to_owned(), |release| release.trim().to_owned())
}
