//! Chaos on the simulated node: the chart's DaemonSet (`daemonset_node`), four pods with roles (two
//! in one namespace) and one without, all asking for credentials as SDKs do (a new connection per
//! request or keep-alive, IMDSv2 tokens or not), while everything that broke the older tools happens
//! one fault after another, some at once: the agent killed and replaced the DaemonSet's way three times,
//! the API server gone and back (once while the agent restarts), its watches reset with 410 Gone, pods deleted and re-created under
//! the same name and IP with new roles (one of them while the API server is gone), and STS down for
//! 10 s, then throttling for 10 s. Afterwards the clients' own records are counted: no response may
//! carry another pod's or the node's credentials (STS says whose every key is), no pod connection may
//! reach the node's metadata service, the pod without a role is never served, and every pod is served
//! again within 5 s of each fault's end.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use interceptor_tests::{
    agent::ACCOUNT_ID,
    daemonset_node::{DEFAULT_VALUES, DaemonSetNode, can_run, ready_at_us},
    deployed::role_list_becomes,
    kube_node::pod_object,
    load::{ClientPath, LoadClient, Records, caller_arns, now_us},
    sim::{self, SimNode},
    sts_proxy::StsMode,
};

const ROLE_KEY: &str = "iam.amazonaws.com/role";
/// Between two attempts of a client: at most 25 credential fetches (50 requests) a second per pod, far
/// more than any SDK makes, within the agent's default 100 requests a second per pod, and little
/// enough that five clients leave the 2-core node room for the agent.
const CLIENT_PAUSE: Duration = Duration::from_millis(40);
/// Every pod must be served again within this of a fault's end.
const RECOVERY: Duration = Duration::from_secs(5);
/// Time between one fault's end and the next one's start, so recoveries are seen apart.
const SETTLE: Duration = Duration::from_secs(3);
/// The length of the run, from every pod served to the clients' stop.
const RUN: Duration = Duration::from_secs(60);
/// How long the API server stays gone each time.
const API_OUTAGE: Duration = Duration::from_secs(5);

/// A pod of the run: where it runs, what it is in the API, and the client asking in it.
struct PodUnderTest {
    name: &'static str,
    namespace: &'static str,
    /// Its role annotation; `None` for the pod that must never be served.
    role: Option<&'static str>,
    pod: sim::Pod,
    container: PathBuf,
    client: LoadClient,
    started_us: u128,
}

impl PodUnderTest {
    /// Stops the pod's client: what it recorded, and the pod itself, its cgroups still there.
    async fn stop(self) -> Result<(FinishedPod, sim::Pod)> {
        let path = self.client.path();
        let records = self.client.finish().await?;
        let finished = FinishedPod {
            label: format!("{}/{} ({})", self.namespace, self.name, self.pod.uid),
            role: self.role,
            path,
            started_us: self.started_us,
            stopped_us: now_us(),
            records,
        };
        Ok((finished, self.pod))
    }
}

/// A pod whose client has stopped, with what it recorded.
struct FinishedPod {
    label: String,
    role: Option<&'static str>,
    path: ClientPath,
    started_us: u128,
    stopped_us: u128,
    records: Records,
}

/// A fault: what it was, and when it began and ended (µs since the epoch).
struct Fault {
    what: String,
    began_us: u128,
    ended_us: u128,
}

/// The run: the node and its DaemonSet, the pods asking now, those done, and the faults so far.
struct Chaos {
    cluster: DaemonSetNode,
    pods: Vec<PodUnderTest>,
    finished: Vec<FinishedPod>,
    faults: Vec<Fault>,
}

impl Chaos {
    /// Creates the pod `namespace/name` on the node (in `network_of`'s network, when given: a pod
    /// re-created on the IP its predecessor had), applies its Pod object and starts its client.
    fn add_pod(
        &mut self,
        namespace: &'static str,
        name: &'static str,
        role: Option<&'static str>,
        path: ClientPath,
        network_of: Option<&sim::Pod>,
    ) -> Result<()> {
        let pod = match network_of {
            Some(previous) => self.cluster.node.pod_sharing(previous)?,
            None => self.cluster.node.pod()?,
        };
        let container = pod.container()?;
        let annotations: Vec<(&str, &str)> = role.iter().map(|role| (ROLE_KEY, *role)).collect();
        self.cluster
            .api
            .apply_pod(pod_object(&pod, namespace, name, &annotations));
        let started_us = now_us();
        let client = LoadClient::start_paced(&pod, &container, path, CLIENT_PAUSE)?;
        self.pods.push(PodUnderTest {
            name,
            namespace,
            role,
            pod,
            container,
            client,
            started_us,
        });
        Ok(())
    }

    /// Deletes `name` and creates it again under the same name, on the same IP, with `role`, as a
    /// StatefulSet's pod is: the old pod's container stops (the client with it) and its Pod object is
    /// deleted; the new pod shares the old one's network, whose cgroups then go.
    async fn recreate_pod(&mut self, name: &'static str, role: &'static str) -> Result<()> {
        let index = self
            .pods
            .iter()
            .position(|pod| pod.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let gone = self.pods.remove(index);
        let (namespace, path) = (gone.namespace, gone.client.path());
        let (finished, previous) = gone.stop().await?;
        self.finished.push(finished);
        ensure!(
            self.cluster.api.delete_pod(namespace, name),
            "{name} was not in the API"
        );
        self.add_pod(namespace, name, Some(role), path, Some(&previous))?;
        previous.remove()
    }

    fn record(&mut self, what: impl Into<String>, began_us: u128, ended_us: u128) {
        let what = what.into();
        println!(
            "{:>6.2} s  {what} ({:.2} s)",
            self.seconds_since_first(began_us),
            (ended_us - began_us) as f64 / 1e6
        );
        self.faults.push(Fault {
            what,
            began_us,
            ended_us,
        });
    }

    fn seconds_since_first(&self, at_us: u128) -> f64 {
        let first = self.faults.first().map_or(at_us, |fault| fault.began_us);
        at_us.saturating_sub(first) as f64 / 1e6
    }

    /// Kills the agent and starts its container again the DaemonSet's way; returns once it is ready.
    fn restart_agent(&mut self, round: usize) -> Result<()> {
        let began = now_us();
        self.cluster
            .restart_agent()
            .with_context(|| format!("restart {round}"))?;
        let ready = ready_at_us(&self.cluster.agent)?;
        self.record(format!("agent restart {round}"), began, ready);
        Ok(())
    }

    fn set_sts(&self, mode: StsMode) {
        self.cluster
            .sts_proxy
            .as_ref()
            .expect("the node was started behind the STS proxy")
            .set_mode(mode);
    }

    /// Stops every client and returns all the pods' records.
    async fn finish(mut self) -> Result<(DaemonSetNode, Vec<FinishedPod>, Vec<Fault>)> {
        for pod in std::mem::take(&mut self.pods) {
            self.finished.push(pod.stop().await?.0);
        }
        Ok((self.cluster, self.finished, self.faults))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn under_every_fault_at_once_no_pod_gets_another_identity_and_all_recover_within_five_seconds()
-> Result<()> {
    if !can_run("chaos") {
        return Ok(());
    }
    let cluster = DaemonSetNode::start_behind_sts_proxy(SimNode::new()?, DEFAULT_VALUES)?;
    let mut chaos = Chaos {
        cluster,
        pods: Vec::new(),
        finished: Vec::new(),
        faults: Vec::new(),
    };
    let plan = [
        ("shop", "alpha", Some("app-alpha"), ClientPath::NEW_CONNECTIONS),
        (
            "shop",
            "bravo",
            Some("app-bravo"),
            ClientPath::KEEP_ALIVE.with_imds_v2(),
        ),
        ("billing", "charlie", Some("app-charlie"), ClientPath::KEEP_ALIVE),
        (
            "search",
            "delta",
            Some("app-delta"),
            ClientPath::NEW_CONNECTIONS.with_imds_v2(),
        ),
        ("shop", "plain", None, ClientPath::NEW_CONNECTIONS),
    ];
    for (namespace, name, role, path) in plan {
        chaos.add_pod(namespace, name, role, path, None)?;
    }
    for pod in chaos.pods.iter().filter(|pod| pod.role.is_some()) {
        ensure!(
            role_list_becomes(&pod.pod, &pod.container, (200, "")).await,
            "{} was never served",
            pod.name
        );
    }
    let start = now_us();
    chaos.record("start: every pod with a role served", start, start);

    chaos.restart_agent(1)?;
    tokio::time::sleep(SETTLE).await;

    // The API server goes away; while it is gone, charlie is deleted and re-created with a new role,
    // on its old IP: the agent must not serve the new pod before it knows it, nor anything else.
    let began = now_us();
    chaos.cluster.api.set_down(true);
    chaos.recreate_pod("charlie", "app-charlie-2").await?;
    tokio::time::sleep(API_OUTAGE).await;
    chaos.cluster.api.set_down(false);
    chaos.record(
        "API server gone for 5 s; charlie re-created meanwhile",
        began,
        now_us(),
    );
    tokio::time::sleep(SETTLE).await;

    // The history the agent's watch resumes from is compacted away: 410 Gone, and a fresh list.
    let began = now_us();
    chaos.cluster.api.compact();
    chaos.cluster.api.cut_watches();
    chaos.record("watch reset with 410 Gone", began, now_us());
    tokio::time::sleep(SETTLE).await;

    let began = now_us();
    chaos.recreate_pod("delta", "app-delta-2").await?;
    chaos.record("delta re-created with a new role", began, now_us());
    tokio::time::sleep(SETTLE).await;

    // The agent restarts while the API server is gone: the new agent cannot list its pods, so it
    // serves nobody (fail closed) until the API server is back and it has listed them.
    let began = now_us();
    chaos.cluster.api.set_down(true);
    chaos
        .cluster
        .restart_agent_while(|api| {
            std::thread::sleep(API_OUTAGE);
            api.set_down(false);
        })
        .context("restart 2")?;
    let ready = ready_at_us(&chaos.cluster.agent)?;
    chaos.record(
        "agent restart 2 while the API server is gone for 5 s",
        began,
        ready.max(began + API_OUTAGE.as_micros()),
    );
    tokio::time::sleep(SETTLE).await;

    // STS down, then throttling: pods with sets keep being served; alpha, re-created with a new role
    // while STS is down, is served once STS answers again.
    let began = now_us();
    chaos.set_sts(StsMode::Down);
    chaos.recreate_pod("alpha", "app-alpha-2").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    chaos.set_sts(StsMode::Throttle);
    tokio::time::sleep(Duration::from_secs(10)).await;
    chaos.set_sts(StsMode::Forward);
    chaos.record(
        "STS down 10 s, then throttling 10 s; alpha re-created meanwhile",
        began,
        now_us(),
    );
    tokio::time::sleep(SETTLE).await;

    chaos.restart_agent(3)?;
    // The clients ask on until the run has lasted its minute, and at least RECOVERY past the last fault.
    let run_end = start + RUN.as_micros();
    let remaining = Duration::from_micros(u64::try_from(run_end.saturating_sub(now_us()))?);
    tokio::time::sleep(remaining.max(RECOVERY + SETTLE)).await;

    let (cluster, finished, faults) = chaos.finish().await?;
    print_counts(&finished, &faults);
    let proxy = cluster.sts_proxy.as_ref().context("the STS proxy")?;
    println!(
        "STS: {} AssumeRole calls answered by moto; {} connections reset while it was down, {} calls \
         answered Throttling",
        cluster.moto.assume_role_calls()?,
        proxy.handled(StsMode::Down),
        proxy.handled(StsMode::Throttle)
    );
    assert_only_own_credentials(&cluster, &finished).await?;
    assert_eq!(
        cluster.stand_in.tcp_accepted(),
        0,
        "a pod connection reached the node's metadata service: {:?}",
        cluster.stand_in.metadata_paths()
    );
    let plain = finished
        .iter()
        .find(|pod| pod.role.is_none())
        .context("the pod without a role")?;
    let served = plain.records.served();
    assert_eq!(served, 0, "the pod without a role was served {served} times");
    assert_recovered(&finished, &faults)
}

/// Every answer is the pod's own role's: the role list says so, each key went to one role's pods, and
/// STS says each key is that role's.
async fn assert_only_own_credentials(cluster: &DaemonSetNode, finished: &[FinishedPod]) -> Result<()> {
    let mut key_owner: BTreeMap<&str, &str> = BTreeMap::new();
    let mut credentials = BTreeMap::new();
    for pod in finished {
        for (listed, key) in pod
            .records
            .attempts
            .iter()
            .filter_map(|attempt| attempt.got.as_ref())
        {
            let role = pod
                .role
                .with_context(|| format!("{} has no role but got {key}", pod.label))?;
            ensure!(listed == role, "{} of {role} was listed {listed}", pod.label);
            let owner = key_owner.entry(key).or_insert(role);
            ensure!(*owner == role, "{key} went to pods of {owner} and {role}");
        }
        credentials.extend(pod.records.credentials.clone());
    }
    let arns = caller_arns(&cluster.node, &cluster.moto.url(), &credentials).await?;
    for (key, role) in &key_owner {
        let arn = arns
            .get(*key)
            .with_context(|| format!("STS did not say whose {key} is"))?;
        ensure!(
            arn.starts_with(&format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/")),
            "{key} served to {role}'s pod is {arn}'s"
        );
    }
    println!(
        "{} distinct credentials served, each to its own role's pod only (STS confirmed all)",
        key_owner.len()
    );
    Ok(())
}

/// Every pod with a role that was asking across a fault's end got credentials within [`RECOVERY`] of it.
fn assert_recovered(finished: &[FinishedPod], faults: &[Fault]) -> Result<()> {
    let recovery_us = RECOVERY.as_micros();
    let mut slowest = Duration::ZERO;
    for fault in faults {
        for pod in finished.iter().filter(|pod| pod.role.is_some()) {
            if pod.started_us > fault.ended_us || pod.stopped_us < fault.ended_us + recovery_us {
                continue; // not asking across this fault's end
            }
            let first = pod
                .records
                .attempts
                .iter()
                .find(|attempt| attempt.at_us > fault.ended_us && attempt.got.is_some())
                .map(|attempt| attempt.at_us - fault.ended_us);
            let waited = first.map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX)));
            ensure!(
                waited.is_some_and(|waited| waited <= RECOVERY),
                "{} got nothing within {RECOVERY:?} of the end of \"{}\" (first after {waited:?})",
                pod.label,
                fault.what
            );
            slowest = slowest.max(waited.unwrap_or_default());
        }
    }
    println!("every pod with a role served again within {slowest:?} of each fault's end");
    Ok(())
}

/// Per pod: requests, served, errors by kind; and the longest gap between two served attempts.
fn print_counts(finished: &[FinishedPod], faults: &[Fault]) {
    let began = faults.first().map_or(0, |first| first.began_us);
    let stopped = finished.iter().map(|pod| pod.stopped_us).max().unwrap_or(began);
    println!(
        "{} faults in a run of {:.1} s, {} pods",
        faults.len() - 1,
        (stopped - began) as f64 / 1e6,
        finished.len()
    );
    for pod in finished {
        let attempts = &pod.records.attempts;
        let served = pod.records.served();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for error in attempts.iter().filter_map(|attempt| attempt.error.as_deref()) {
            *errors.entry(error_kind(error)).or_default() += 1;
        }
        let longest_gap = attempts
            .iter()
            .filter(|attempt| attempt.got.is_some())
            .map(|attempt| attempt.at_us)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default();
        println!(
            "{} role {} via {}: {} attempts, {served} served, errors {errors:?}, longest wait between two served {:.2} s",
            pod.label,
            pod.role.unwrap_or("none"),
            pod.path.describe(),
            attempts.len(),
            longest_gap as f64 / 1e6
        );
    }
}

/// An error's kind for the counts: the HTTP status, or what failed on the connection.
fn error_kind(error: &str) -> String {
    match error.split_once("status ") {
        Some((_, status)) => format!("HTTP {}", &status[..status.len().min(3)]),
        None => error.split(':').next().unwrap_or(error).to_owned(),
    }
}
