//! What holds while no agent serves, tried as an attacker would: a hostNetwork pod binding the agent's
//! ports (its metadata port and its health port, every address form) while the agent runs, while it
//! is down and while it restarts; a port taken before the first agent starts; the window after a
//! reboot, when bpffs is empty and the kubelet starts pods beside the agent; and agent containers that
//! fail before they attach, over and over.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use interceptor_common::{names, sizes};
use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN, WorkloadFile},
    deployed::{DeployedNode, METRICS_PORT, Sts, eventually, role_list},
    kernel,
    lab::{Interactive, StandIn, run},
    privileged,
    probe::{Outcome, Probe, now_us},
    sim::{AGENT_PORT, METADATA_IP, NODE_IP, NODE_IP6, Pod, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const ROLE_LIST_PATH: &str = "/latest/meta-data/iam/security-credentials/";

fn is_alpha(outcome: &Outcome) -> bool {
    *outcome
        == Outcome::Answer {
            status: 200,
            body: "alpha".to_owned(),
        }
}

/// Every address a process in the node's network namespace could listen on for `port`: the agent's,
/// the node's others, the wildcards, loopback, and the IPv4 ones in IPv4-mapped form.
fn address_forms(port: u16) -> Vec<SocketAddr> {
    let ips: [IpAddr; 8] = [
        NODE_IP.into(),
        Ipv4Addr::UNSPECIFIED.into(),
        Ipv4Addr::LOCALHOST.into(),
        Ipv6Addr::UNSPECIFIED.into(),
        NODE_IP6.into(),
        Ipv6Addr::LOCALHOST.into(),
        NODE_IP.to_ipv6_mapped().into(),
        Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().into(),
    ];
    ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect()
}

/// The agent's two ports in every address form.
fn agent_ports() -> Vec<SocketAddr> {
    [AGENT_PORT, METRICS_PORT]
        .into_iter()
        .flat_map(address_forms)
        .collect()
}

/// `sim-client squat`: a process that tries to listen where the agent does.
struct Squatter {
    client: Interactive,
    bound: Vec<String>,
    refused: Vec<String>,
}

/// What a squatter got in the end.
#[derive(Debug)]
struct Squatted {
    attempts: usize,
    bound: usize,
    answered: usize,
}

impl Squatter {
    /// Starts a squatter in `cgroup` and the node's network namespace (a hostNetwork pod's container
    /// when `cgroup` is under kubepods), once it has tried every address once. With `retry`, it keeps
    /// trying the refused ones that often.
    async fn start(
        node: &SimNode,
        cgroup: &Path,
        addrs: &[SocketAddr],
        retry: Option<Duration>,
    ) -> Result<Self> {
        Self::spawn(node.command(cgroup, SIM_CLIENT)?, addrs, retry).await
    }

    /// The same in `pod`'s own network namespace.
    async fn start_in_pod(pod: &Pod, cgroup: &Path, addrs: &[SocketAddr]) -> Result<Self> {
        Self::spawn(pod.command(cgroup, SIM_CLIENT)?, addrs, None).await
    }

    async fn spawn(
        mut command: std::process::Command,
        addrs: &[SocketAddr],
        retry: Option<Duration>,
    ) -> Result<Self> {
        command.arg("squat").args(addrs.iter().map(SocketAddr::to_string));
        if let Some(retry) = retry {
            command.args(["--retry-ms", &retry.as_millis().to_string()]);
        }
        let mut client = Interactive::spawn(command)?;
        let (mut bound, mut refused) = (Vec::new(), Vec::new());
        loop {
            let line = client.line().await?;
            match line.split_once(' ') {
                _ if line == "ready" => break,
                Some(("bound", addr)) => bound.push(addr.to_owned()),
                Some(("refused", what)) => refused.push(what.to_owned()),
                _ => anyhow::bail!("a squatter line the test does not know: {line}"),
            }
        }
        Ok(Self {
            client,
            bound,
            refused,
        })
    }

    /// Fails unless every bind was refused with EPERM, the programs' answer.
    fn assert_all_refused(&self, when: &str) {
        assert!(self.bound.is_empty(), "{when}: a workload bound {:?}", self.bound);
        for refusal in &self.refused {
            assert!(
                refusal.contains("Operation not permitted"),
                "{when}: refused for another reason: {refusal}"
            );
        }
    }

    async fn finish(self) -> Result<Squatted> {
        let output = self.client.finish_output().await?;
        let summary = output.last().context("the squatter printed no summary")?;
        let field = |name: &str| -> Result<usize> {
            summary
                .split_whitespace()
                .find_map(|field| field.strip_prefix(&format!("{name}=")))
                .and_then(|value| value.parse().ok())
                .with_context(|| format!("no {name} in {summary:?}"))
        };
        Ok(Squatted {
            attempts: field("attempts")?,
            bound: field("bound")?,
            answered: field("answered")?,
        })
    }
}

/// Tries every address once, then stops: what was refused and what bound.
async fn squat_once(node: &SimNode, cgroup: &Path, addrs: &[SocketAddr], when: &str) -> Result<usize> {
    let squatter = Squatter::start(node, cgroup, addrs, None).await?;
    squatter.assert_all_refused(when);
    let refused = squatter.refused.len();
    let squatted = squatter.finish().await?;
    assert_eq!(
        squatted.answered, 0,
        "{when}: a pod's request reached the squatter"
    );
    Ok(refused)
}

/// What a pod's GET of the role list got, through `sim-client http` (which says why a connect failed):
/// the body, or the error.
async fn pod_role_list(pod: &Pod, container: &Path) -> Result<String, String> {
    let mut command = pod
        .command(container, SIM_CLIENT)
        .map_err(|err| err.to_string())?;
    command.args(["http", &format!("{METADATA_IP}:80"), "--path", ROLE_LIST_PATH]);
    run(command).await.map_err(|err| format!("{err:#}"))
}

/// The value of the agent's metric line that starts with `series`, read from its health server.
async fn metric(t: &DeployedNode, series: &str) -> Result<u64> {
    let (_, body) = t.health("/metrics").await?;
    body.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no {series} in the metrics"))
}

/// A node with a pod of role `alpha` (and its container), and a hostNetwork pod's container cgroup
/// for the squatter: under kubepods, while its processes run in the node's network.
struct Cast {
    node: SimNode,
    pod: Pod,
    container: PathBuf,
    squatter_cgroup: PathBuf,
}

impl Cast {
    fn new() -> Result<Self> {
        let mut node = SimNode::new()?;
        let pod = node.pod()?;
        let container = pod.container()?;
        let squatter_cgroup = node.pod()?.container()?;
        Ok(Self {
            node,
            pod,
            container,
            squatter_cgroup,
        })
    }

    /// The node deployed with its agent serving `pod` its role (STS down: the role list is enough).
    fn deploy(self) -> Result<(DeployedNode, Pod, PathBuf, PathBuf)> {
        let t = DeployedNode::start(self.node, &[(self.pod.slice(), "alpha")], Sts::Down, &[])?;
        Ok((t, self.pod, self.container, self.squatter_cgroup))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_workload_can_take_the_agents_ports_while_it_runs_is_down_or_restarts() -> Result<()> {
    if !privileged::can_run("squatting") {
        return Ok(());
    }
    let (mut t, pod, container, squatter_cgroup) = Cast::new()?.deploy()?;
    let addrs = agent_ports();

    // While the agent runs.
    let refused = squat_once(&t.node, &squatter_cgroup, &addrs, "agent running").await?;
    assert_eq!(refused, addrs.len());
    assert_eq!(pod_role_list(&pod, &container).await, Ok("alpha".to_owned()));
    let counted = metric(&t, "interceptor_bpf_binds_refused_total{reason=\"agent_port\"}").await?;
    assert!(
        counted >= refused as u64,
        "{counted} binds counted, {refused} refused"
    );

    // While it is down: the pinned programs keep the ports, and the pod's connects find no one.
    t.agent.kill()?;
    let refused_down = squat_once(&t.node, &squatter_cgroup, &addrs, "agent down").await?;
    let down = pod_role_list(&pod, &container).await;
    assert!(
        down.as_ref().is_err_and(|err| !err.contains("squatter")),
        "a pod was answered with the agent down: {down:?}"
    );

    // While it restarts: a squatter tries every address every 2 ms from before the start to after.
    let squatter = Squatter::start(&t.node, &squatter_cgroup, &addrs, Some(Duration::from_millis(2))).await?;
    squatter.assert_all_refused("agent restarting");
    t.restart_agent()?;
    assert_eq!(pod_role_list(&pod, &container).await, Ok("alpha".to_owned()));
    let squatted = squatter.finish().await?;
    assert_eq!(
        (squatted.bound, squatted.answered),
        (0, 0),
        "the squatter got a port while the agent restarted: {squatted:?}"
    );
    assert!(squatted.attempts > addrs.len() * 2, "{squatted:?}");
    // The counters are pinned with the programs: the binds refused while no agent ran count too.
    let refused_in_all = (refused + refused_down + squatted.attempts) as u64;
    let counted = metric(&t, "interceptor_bpf_binds_refused_total{reason=\"agent_port\"}").await?;
    assert!(
        counted >= refused_in_all,
        "{counted} binds counted, {refused_in_all} refused"
    );

    // A pod's own network is its own business: it may listen on the same port number there, and the
    // node's own services (outside the pods' cgroups) are not the guard's either.
    let own_network = Squatter::start_in_pod(&pod, &container, &address_forms(AGENT_PORT)[1..2]).await?;
    assert_eq!(own_network.bound.len(), 1, "{:?}", own_network.refused);
    own_network.finish().await?;
    let node_service = t.node.cgroup("system.slice/other.service")?;
    let loopback = [SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_PORT))];
    let node_squatter = Squatter::start(&t.node, &node_service, &loopback, None).await?;
    assert_eq!(node_squatter.bound.len(), 1, "{:?}", node_squatter.refused);
    node_squatter.finish().await?;

    assert_eq!(
        t.stand_in.tcp_accepted(),
        0,
        "a pod reached the node's metadata service"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_cannot_bind_its_port_leaves_pods_refused_not_sent_to_whoever_holds_it() -> Result<()> {
    if !privileged::can_run("port taken") {
        return Ok(());
    }
    let Cast {
        node,
        pod,
        container,
        squatter_cgroup,
    } = Cast::new()?;
    let stand_in = StandIn::start(&node)?;
    let workloads = WorkloadFile::new(&[(pod.slice(), "alpha")])?;
    let agent_command = || -> Result<std::process::Command> {
        let mut command = Agent::command(&node)?;
        Agent::node_flags(&mut command, &node, &workloads.path()).args(["--base-role-arn", BASE_ROLE_ARN]);
        Ok(command)
    };

    // Before any agent ever ran on the node (no guard at boot either), a hostNetwork pod listens on
    // the agent's address.
    let squatter = Squatter::start(&node, &squatter_cgroup, &[SocketAddr::V4(node.agent_v4())], None).await?;
    assert_eq!(squatter.bound.len(), 1, "{:?}", squatter.refused);

    let (status, log) = Agent::run_to_exit(agent_command()?)?;
    assert!(!status.success(), "the agent ran on a port it does not hold");
    let failure = log.join("\n");
    assert!(
        failure.contains("cannot bind 10.99.0.1:8181")
            && failure.contains("metadata connects are refused until an agent serves"),
        "{failure}"
    );
    // The programs stay, refusing: the pod's connect fails at once, and nothing reaches the squatter
    // or the node's metadata service.
    for _ in 0..5 {
        let refused = pod_role_list(&pod, &container).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|err| err.contains("Operation not permitted")),
            "{refused:?}"
        );
    }
    let squatted = squatter.finish().await?;
    assert_eq!(squatted.answered, 0, "a pod's request reached the squatter");
    assert_eq!(
        stand_in.tcp_accepted(),
        0,
        "a pod reached the node's metadata service"
    );

    // Once the port is free, an agent takes it, and the pod is served.
    let _agent = Agent::start(agent_command()?)?;
    assert_eq!(pod_role_list(&pod, &container).await, Ok("alpha".to_owned()));
    Ok(())
}

/// The unit `deploy/node/interceptor-guard.service`'s command on `node`, in the unit's cgroup: its
/// `ExecStart` as written, with the binary built here, and the simulated node's cgroup root and bpffs
/// directory through the environment (on a node, the defaults find them).
fn guard_unit_command(node: &SimNode) -> Result<std::process::Command> {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node/interceptor-guard.service");
    let unit = std::fs::read_to_string(&unit_path)?;
    let exec_start = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .context("the unit has no ExecStart")?;
    let mut words = exec_start.split_whitespace();
    ensure!(words.next() == Some("/usr/local/bin/interceptor"), "{exec_start}");
    let cgroup = node.cgroup("system.slice/interceptor-guard.service")?;
    let mut command = node.command(&cgroup, Agent::binary()?)?;
    command
        .env_clear()
        .args(words)
        .env("INTERCEPTOR_CGROUP_ROOT", node.kubepods())
        .env("INTERCEPTOR_BPFFS_DIR", node.bpffs_dir());
    Ok(command)
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_reboot_the_guard_refuses_pods_until_the_agent_serves() -> Result<()> {
    if !privileged::can_run("reboot window") {
        return Ok(());
    }
    let (mut t, pod, container, squatter_cgroup) = Cast::new()?.deploy()?;
    assert_eq!(role_list(&pod, &container).await?, (200, "alpha".to_owned()));

    // The node reboots: the agent is gone, and with the pins so are its programs.
    t.agent.kill()?;
    t.node.reboot()?;
    let root = t.node.kubepods().to_path_buf();
    let detached = eventually(|| async {
        kernel::AGENT_ATTACH_TYPES
            .iter()
            .all(|&attach_type| kernel::attached_programs(&root, attach_type).is_ok_and(|ids| ids.is_empty()))
    })
    .await;
    assert!(detached, "the programs outlived the reboot");
    // This is the window: with nothing attached, a pod reaches the node's metadata service.
    assert_eq!(
        role_list(&pod, &container).await?,
        (200, StandIn::NODE_ROLE.to_owned()),
        "without the guard a pod reaches the node's metadata service"
    );
    let reached_before_guard = t.stand_in.tcp_accepted();
    assert_eq!(reached_before_guard, 1);

    // The node's bootstrap runs the guard before the kubelet: the systemd unit the docs ship, as a
    // node service outside the pods.
    let said = run(guard_unit_command(&t.node)?).await?;
    assert!(said.contains("refused"), "{said}");

    // The kubelet starts pods; they ask without pause while the agent is not there yet.
    // A timeout an emulated VM's slowest answer fits in: what this asserts is who answers.
    let probe = Probe::start(
        pod.command(&container, SIM_CLIENT)?,
        ROLE_LIST_PATH,
        Duration::from_secs(5),
    )?;
    let asked_from = now_us();
    while probe.attempts().len() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    squat_once(&t.node, &squatter_cgroup, &agent_ports(), "after the guard").await?;

    // The agent starts (its pod, as a DaemonSet's, comes up beside the others) and takes over.
    t.restart_agent()?;
    let served = probe.wait_for(asked_from, is_alpha).await?;
    let after_serving = probe.wait_for(served.at_us, is_alpha).await?;
    probe.wait_for(after_serving.at_us, is_alpha).await?;
    let attempts = probe.finish().await?;
    let (before, after): (Vec<_>, Vec<_>) = attempts.iter().partition(|attempt| attempt.at_us < served.at_us);
    assert!(before.len() >= 20, "{before:?}");
    // Refused by the programs, never "connection refused": the agent listens before it redirects.
    for attempt in &before {
        assert!(
            attempt.outcome.refused_by_the_programs(),
            "before the agent served, a pod got {attempt:?}"
        );
    }
    assert!(
        after.iter().all(|attempt| is_alpha(&attempt.outcome)),
        "{after:?}"
    );
    // What the guard's programs refused is counted by the agent that took them over.
    let not_serving = metric(&t, "interceptor_bpf_connections_total{outcome=\"not_serving\"}").await?;
    assert!(
        not_serving >= before.len() as u64,
        "{not_serving} counted, {} refused",
        before.len()
    );
    let binds = metric(&t, "interceptor_bpf_binds_refused_total{reason=\"agent_port\"}").await?;
    assert!(binds >= agent_ports().len() as u64, "{binds} binds counted");
    assert_eq!(
        t.stand_in.tcp_accepted(),
        reached_before_guard,
        "a pod reached the node's metadata service after the guard"
    );

    // The guard run again on a node whose agent serves changes nothing.
    let said = run(guard_unit_command(&t.node)?).await?;
    assert!(said.contains("left as they are"), "{said}");
    assert_eq!(role_list(&pod, &container).await?, (200, "alpha".to_owned()));
    Ok(())
}

/// How many cgroups the pinned exempt set holds.
fn exempt_entries(bpffs_dir: &Path) -> Result<usize> {
    let path = interceptor::bpf::pin::PinDir::at(bpffs_dir).map(names::EXEMPT_CGROUPS);
    let map = aya::maps::MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let set = aya::maps::HashMap::<_, u64, u8>::try_from(aya::maps::Map::HashMap(map))?;
    Ok(set.keys().filter_map(Result::ok).count())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_that_fail_before_attaching_cannot_fill_the_exempt_set() -> Result<()> {
    if !privileged::can_run("exempt set") {
        return Ok(());
    }
    let (mut t, pod, container, _) = Cast::new()?.deploy()?;
    t.agent.kill()?;

    // More failed starts than the set has room for, each in a new container cgroup that goes when the
    // container does, as a crash-looping DaemonSet pod's.
    let failures = sizes::EXEMPT_CGROUPS as usize + 6;
    for attempt in 0..failures {
        let cgroup = t
            .node
            .cgroup(&format!("system.slice/interceptor-{attempt}.service"))?;
        let mut command = t.agent_command_in(&cgroup)?;
        command.args(["--iam-role-session-ttl", "1m"]);
        let (status, log) = Agent::run_to_exit(command)?;
        ensure!(
            !status.success() && log.join("\n").contains("--iam-role-session-ttl must be between"),
            "attempt {attempt} did not fail in its configuration: {}",
            log.join("\n")
        );
        std::fs::remove_dir(&cgroup).with_context(|| format!("remove {}", cgroup.display()))?;
    }
    let entries = exempt_entries(&t.node.bpffs_dir())?;
    assert!(
        entries <= 2,
        "{entries} cgroups are exempt after {failures} failed starts"
    );

    let cgroup = t.node.cgroup("system.slice/interceptor-good.service")?;
    t.restart_agent_in(cgroup)?;
    assert_eq!(role_list(&pod, &container).await?, (200, "alpha".to_owned()));
    assert_eq!(exempt_entries(&t.node.bpffs_dir())?, 1);
    Ok(())
}

#[test]
fn the_guard_unit_is_one_systemd_accepts() -> Result<()> {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node/interceptor-guard.service");
    let unit = std::fs::read_to_string(&unit_path)?;
    assert!(
        unit.contains("Before=kubelet.service") && unit.contains("Type=oneshot"),
        "{unit}"
    );
    // systemd-analyze checks that ExecStart's program exists: the binary built here stands in for the
    // one installed on a node.
    let dir = tempfile::tempdir()?;
    let checked = dir.path().join("interceptor-guard.service");
    std::fs::write(
        &checked,
        unit.replace(
            "/usr/local/bin/interceptor",
            Agent::binary()?.to_str().context("a UTF-8 path")?,
        ),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .context("cannot run systemd-analyze (Debian's systemd)")?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restarted_on_another_port_guards_that_one_and_frees_the_old() -> Result<()> {
    if !privileged::can_run("port move") {
        return Ok(());
    }
    let (mut t, pod, container, squatter_cgroup) = Cast::new()?.deploy()?;
    t.agent.kill()?;
    let moved = SocketAddr::from((NODE_IP, AGENT_PORT + 1));
    let mut command = t.agent_command_in(&t.node.cgroup("system.slice/interceptor.service")?)?;
    command.args(["--agent-addr", &moved.to_string()]);
    t.agent = Agent::start(command)?;
    assert_eq!(pod_role_list(&pod, &container).await, Ok("alpha".to_owned()));

    let old = SocketAddr::from((NODE_IP, AGENT_PORT));
    let squatter = Squatter::start(&t.node, &squatter_cgroup, &[old, moved], None).await?;
    assert_eq!(squatter.bound, [old.to_string()], "{:?}", squatter.refused);
    assert!(
        squatter
            .refused
            .iter()
            .all(|refusal| refusal.starts_with(&moved.to_string())
                && refusal.contains("Operation not permitted")),
        "{:?}",
        squatter.refused
    );
    // Pods' connections go to the new port, never to whoever holds the old one.
    assert_eq!(pod_role_list(&pod, &container).await, Ok("alpha".to_owned()));
    assert_eq!(squatter.finish().await?.answered, 0);
    Ok(())
}
