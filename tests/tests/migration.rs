//! Switching a node from kube2iam to interceptor, and back, by deploy/README.md's procedure, while
//! pods and node daemons ask without pause, counted from the clients' side. The node is as kube2iam
//! users have theirs: kube2iam's DNAT rule (real iptables) on the pods' Calico interfaces to its agent
//! on `HOST_IP:8181`, hostNetwork daemons (a CNI's, a termination handler's) that reach the node's
//! metadata service directly, and kube2iam's preStop command removing the rule when it goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Result, ensure};
use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN, NO_STS},
    kube_api::FakeApiServer,
    kube_node::{NODE_NAME, host_network_pod_object, pod_object},
    kube2iam::{Kube2iam, metadata_nat_rules},
    lab::{StandIn, run},
    privileged,
    probe::{Attempt, Outcome, Probe, now_us},
    sim::{NODE_IP, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";
const MACS: &str = "/latest/meta-data/network/interfaces/macs/";
const SPOT: &str = "/latest/meta-data/spot/instance-action";
/// kube2iam's port, and interceptor's beside it for the switch (deploy/README.md: `host.port`).
const KUBE2IAM_PORT: u16 = 8181;
const AGENT_PORT: u16 = 8182;
/// The longest a client may go without an answer across a switch: an SDK's retries span more.
const LONGEST_GAP_MS: u128 = 5_000;
/// How long the clients give each connect and each answer: botocore's and aws-sdk-rust's metadata
/// timeouts (aws-sdk-go-v2's are shorter). A connection in flight when the programs attach is dropped
/// (fail closed), and costs its client this.
const SDK_TIMEOUT: Duration = Duration::from_secs(1);

/// Who answered an attempt, read from what it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// kube2iam's agent (through its DNAT rule).
    Kube2iam,
    /// interceptor, with the pod's own role.
    OwnRole,
    /// interceptor's 404 for a pod without a role.
    NoRole,
    /// What the node's metadata service answers that path, directly or through interceptor.
    Node,
    /// Nothing: a connect the programs refused, or a connection cut.
    NoAnswer,
    /// Anything else: a wrong answer.
    Other,
}

/// A pod's role list: kube2iam's role, its own, a 404, or (a leak) the node's role.
fn pod_role_list(outcome: &Outcome) -> Source {
    match outcome {
        Outcome::Answer { status: 200, body } if body == Kube2iam::ROLE => Source::Kube2iam,
        Outcome::Answer { status: 200, body } if body == "alpha" => Source::OwnRole,
        Outcome::Answer { status: 200, body } if body == StandIn::NODE_ROLE => Source::Node,
        Outcome::Answer { status: 404, .. } => Source::NoRole,
        Outcome::Failed(_) => Source::NoAnswer,
        Outcome::Answer { .. } => Source::Other,
    }
}

/// A daemon's read of a node fact: the node's answer, whoever passed it on.
fn node_answer(outcome: &Outcome, expected_first_line: &str) -> Source {
    match outcome {
        Outcome::Answer { status: 200, body } if body == expected_first_line => Source::Node,
        Outcome::Failed(_) => Source::NoAnswer,
        Outcome::Answer { .. } => Source::Other,
    }
}

fn node_fact(path: &str) -> &'static str {
    let below_version = path.trim_start_matches("/latest/");
    StandIn::NODE_FACTS
        .iter()
        .find(|(fact, _)| *fact == below_version)
        .and_then(|(_, answer)| answer.lines().next())
        .unwrap_or_else(|| panic!("the stand-in answers no fact at {path}"))
}

fn macs(outcome: &Outcome) -> Source {
    node_answer(outcome, node_fact(MACS))
}

fn spot_notice(outcome: &Outcome) -> Source {
    node_answer(outcome, node_fact(SPOT))
}

/// The node's credentials document (one line of JSON): the node's access key in it.
fn node_credentials(outcome: &Outcome) -> Source {
    match outcome {
        Outcome::Answer { status: 200, body } if body.contains(StandIn::NODE_ACCESS_KEY) => Source::Node,
        Outcome::Failed(_) => Source::NoAnswer,
        Outcome::Answer { .. } => Source::Other,
    }
}

/// One client: what it is, what it may get, and its probe.
struct Client {
    name: &'static str,
    classify: fn(&Outcome) -> Source,
    /// Every source it may get, at some point of the switch.
    allowed: &'static [Source],
    probe: Probe,
}

impl Client {
    fn answered(&self, outcome: &Outcome) -> bool {
        !matches!((self.classify)(outcome), Source::NoAnswer)
    }
}

/// Waits until every client has been answered `times` times after `since_us` (twice at least, so an
/// attempt begun before `since_us` does not count); returns when.
async fn all_answered_after(clients: &[Client], since_us: u128, times: usize) -> Result<u128> {
    for client in clients {
        let mut last = since_us;
        for _ in 0..times.max(2) {
            last = client
                .probe
                .wait_for(last, |outcome| client.answered(outcome))
                .await?
                .at_us;
        }
    }
    Ok(now_us())
}

/// Answers each client gets in a steady phase before the next step: half a second of asking.
const STEADY: usize = 50;

/// What a client got within a phase: each source, and the longest run without an answer.
#[derive(Debug)]
struct Tally {
    sources: BTreeMap<Source, usize>,
    longest_gap_ms: u128,
    /// Why the attempts without an answer got none.
    failures: BTreeSet<String>,
}

/// Whether a failed attempt waited out its timeout: the connect's (a dropped SYN) or the answer's.
fn timed_out(error: &str) -> bool {
    error.contains("timed out") || error.contains("Resource temporarily unavailable")
}

fn tally(attempts: &[Attempt], classify: fn(&Outcome) -> Source, (from, to): (u128, u128)) -> Tally {
    let mut sources = BTreeMap::new();
    let (mut longest_gap, mut last_answer) = (0, from);
    let mut failures = BTreeSet::new();
    for attempt in attempts
        .iter()
        .filter(|attempt| attempt.at_us > from && attempt.at_us <= to)
    {
        let source = classify(&attempt.outcome);
        *sources.entry(source).or_default() += 1;
        if let Outcome::Failed(error) = &attempt.outcome {
            failures.insert(error.clone());
        }
        if source != Source::NoAnswer {
            longest_gap = longest_gap.max(attempt.at_us - last_answer);
            last_answer = attempt.at_us;
        }
    }
    Tally {
        sources,
        longest_gap_ms: longest_gap / 1000,
        failures,
    }
}

/// The agent as the chart renders it for the switch (`host.port: 8182`): the node's pods from the API
/// server, the default node-credentials setting.
fn agent_command(node: &SimNode, kubeconfig: &Path) -> Result<Command> {
    let mut command = Agent::command(node)?;
    command
        .args(["--agent-addr", &format!("{NODE_IP}:{AGENT_PORT}")])
        .args(["--sts-endpoint", NO_STS, "--base-role-arn", BASE_ROLE_ARN])
        .args(["--node", NODE_NAME])
        .arg("--cgroup-root")
        .arg(node.kubepods())
        .arg("--kubeconfig")
        .arg(kubeconfig);
    Ok(command)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kube2iam_node_switches_to_interceptor_and_back_while_pods_and_daemons_ask() -> Result<()> {
    if !privileged::can_run("migration") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let app = node.pod()?;
    let app_container = app.container()?;
    let plain = node.pod()?;
    let plain_container = plain.container()?;
    let cni = node.host_network_pod()?;
    let cni_container = cni.container()?;
    let handler = node.host_network_pod()?;
    let handler_container = handler.container()?;
    let stand_in = StandIn::start(&node)?;
    let api = FakeApiServer::start(&node)?;
    api.apply_pod(pod_object(
        &app,
        "shop",
        "app",
        &[("iam.amazonaws.com/role", "alpha")],
    ));
    api.apply_pod(pod_object(&plain, "shop", "plain", &[]));
    api.apply_pod(host_network_pod_object(
        &cni,
        "kube-system",
        "aws-node-x1",
        "aws-node",
        &[],
    ));
    api.apply_pod(host_network_pod_object(
        &handler,
        "kube-system",
        "aws-node-termination-handler-x1",
        "aws-node-termination-handler",
        &[],
    ));
    let config_dir = tempfile::tempdir()?;
    let kubeconfig = config_dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;

    // The node as it runs kube2iam, pods and daemons asking without pause.
    let kube2iam = Kube2iam::install(&node, KUBE2IAM_PORT).await?;
    let clients = [
        Client {
            name: "pod with role alpha",
            classify: pod_role_list,
            allowed: &[Source::Kube2iam, Source::OwnRole, Source::NoAnswer],
            probe: Probe::start(app.command(&app_container, SIM_CLIENT)?, ROLE_LIST, SDK_TIMEOUT)?,
        },
        Client {
            name: "pod without a role",
            classify: pod_role_list,
            allowed: &[Source::Kube2iam, Source::NoRole, Source::NoAnswer],
            probe: Probe::start(
                plain.command(&plain_container, SIM_CLIENT)?,
                ROLE_LIST,
                SDK_TIMEOUT,
            )?,
        },
        Client {
            name: "CNI daemon: interfaces",
            classify: macs,
            allowed: &[Source::Node, Source::NoAnswer],
            probe: Probe::start(node.command(&cni_container, SIM_CLIENT)?, MACS, SDK_TIMEOUT)?,
        },
        Client {
            name: "CNI daemon: node credentials",
            classify: node_credentials,
            allowed: &[Source::Node, Source::NoAnswer],
            probe: Probe::start(
                node.command(&cni_container, SIM_CLIENT)?,
                &format!("{ROLE_LIST}{}", StandIn::NODE_ROLE),
                SDK_TIMEOUT,
            )?,
        },
        Client {
            name: "termination handler: spot notice",
            classify: spot_notice,
            allowed: &[Source::Node, Source::NoAnswer],
            probe: Probe::start(node.command(&handler_container, SIM_CLIENT)?, SPOT, SDK_TIMEOUT)?,
        },
    ];
    let started = now_us();
    all_answered_after(&clients, started, STEADY).await?;

    // 1. Install interceptor beside kube2iam, on another port: its redirect happens at connect, before
    //    kube2iam's rule sees a packet.
    let installing = now_us();
    let mut agent = Agent::start(agent_command(&node, &kubeconfig)?)?;
    clients[0]
        .probe
        .wait_for(installing, |outcome| pod_role_list(outcome) == Source::OwnRole)
        .await?;
    let installed = all_answered_after(&clients, now_us(), 2).await?;
    all_answered_after(&clients, installed, STEADY).await?;

    // 2. Remove kube2iam: its pod's preStop deletes its rule, then it stops.
    let removing = now_us();
    Kube2iam::pre_stop(&node).await?;
    drop(kube2iam);
    ensure!(metadata_nat_rules(&node).await?.is_empty());
    let removed = all_answered_after(&clients, now_us(), STEADY).await?;

    // 3. Roll back: kube2iam again (its rule back), `interceptor uninstall` while the agent runs (the
    //    programs stay while the agent holds them), then the agent stops and the programs go with it.
    let rolling_back = now_us();
    let kube2iam = Kube2iam::install(&node, KUBE2IAM_PORT).await?;
    let mut uninstall = node.command(&node.cgroup("system.slice/uninstall.service")?, Agent::binary()?)?;
    uninstall
        .env_clear()
        .arg("uninstall")
        .arg("--bpffs-dir")
        .arg(node.bpffs_dir());
    run(uninstall).await?;
    agent.stop()?;
    clients[0]
        .probe
        .wait_for(rolling_back, |outcome| pod_role_list(outcome) == Source::Kube2iam)
        .await?;
    let rolled_back = all_answered_after(&clients, now_us(), 2).await?;
    let ended = all_answered_after(&clients, rolled_back, STEADY).await?;
    drop(kube2iam);

    let phases = [
        ("kube2iam", (started, installing)),
        ("installing", (installing, installed)),
        ("both", (installed, removing)),
        ("removing kube2iam", (removing, removed)),
        ("rolling back", (rolling_back, rolled_back)),
        ("kube2iam again", (rolled_back, ended)),
    ];
    // What each client got in each phase: the sources it may get there, and no run without an
    // answer longer than an SDK's retries span; in the steady phases, an answer every time.
    for client in clients {
        let attempts = client.probe.finish().await?;
        for (phase, window) in phases {
            let tally = tally(&attempts, client.classify, window);
            println!(
                "{:<34} {phase:<18} {:?}, longest without an answer {} ms {:?}",
                client.name, tally.sources, tally.longest_gap_ms, tally.failures
            );
            for source in tally.sources.keys() {
                assert!(
                    client.allowed.contains(source),
                    "{} got {source:?} ({phase}): {tally:?}",
                    client.name
                );
            }
            assert!(
                tally.longest_gap_ms <= LONGEST_GAP_MS,
                "{}: {phase}: {tally:?}",
                client.name
            );
            // The stopping agent releases its connect programs last: no connect leaves un-redirected
            // into the egress program's drop, so a miss is a quick refusal, never a timeout.
            if phase == "rolling back" {
                assert!(
                    !tally.failures.iter().any(|error| timed_out(error)),
                    "{}: {phase}: {tally:?}",
                    client.name
                );
            }
            if matches!(
                phase,
                "kube2iam" | "both" | "removing kube2iam" | "kube2iam again"
            ) {
                assert!(
                    !tally.sources.contains_key(&Source::NoAnswer),
                    "{}: {phase}: {tally:?}",
                    client.name
                );
            }
        }
    }
    drop((api, stand_in));
    Ok(())
}
