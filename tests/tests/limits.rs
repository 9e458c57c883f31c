//! Per-pod limits tried as a flooding pod would: the real agent with its Kubernetes source and moto as
//! STS, small limits set by flags, a pod of two containers flooding the agent beside a quiet pod; and
//! the global connection cap, which pods holding theirs cannot fill for a pod that comes later.
//! The flood gets its pod's budget and no more, shared by its containers, and its connections past its
//! pod's cap are closed at accept; the quiet pod meanwhile gets every answer, with its own
//! credentials, which the flood never sees. Asserted with counts; the time the run took only bounds
//! how much the budget can have refilled.

use std::{collections::BTreeSet, path::Path, time::Instant};

use anyhow::Result;
use interceptor_tests::{
    bench,
    deployed::{ROLE_LIST, Sts, curl, eventually, health, status_of},
    exposition::sample_value,
    kube_node::{KubeNode, pod_object},
    lab::{Interactive, run},
    privileged,
    sim::{METADATA_IP, Pod, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const ROLE_KEY: &str = "iam.amazonaws.com/role";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

/// The limits the agent runs with here: one request a second after a burst of 20, 16 connections
/// per pod.
const RATE: u64 = 1;
const BURST: u64 = 20;
const CONNECTIONS_PER_POD: usize = 16;

/// `sim-client flood` in a container: `connections` keep-alive connections sending `count` GETs of
/// the credentials of `role` between them.
async fn flood(pod: &Pod, container: &Path, role: &str, connections: usize, count: usize) -> Result<Flood> {
    let mut command = pod.command(container, SIM_CLIENT)?;
    command
        .args(["flood", &format!("{METADATA_IP}:80")])
        .args(["--path", &format!("{CREDENTIALS_PATH}{role}")])
        .args(["--connections", &connections.to_string()])
        .args(["--count", &count.to_string()]);
    Flood::parse(&run(command).await?)
}

/// What `sim-client flood` counted.
#[derive(Debug, PartialEq, Eq)]
struct Flood {
    ok: u64,
    throttled: u64,
    closed: u64,
    other: u64,
    keys: Vec<String>,
}

impl Flood {
    fn parse(line: &str) -> Result<Self> {
        let count = |name: &str| -> Result<u64> { Ok(bench::output_value(line, name)?.parse()?) };
        let keys = match bench::output_value(line, "keys")? {
            "-" => Vec::new(),
            keys => keys.split(',').map(str::to_owned).collect(),
        };
        Ok(Self {
            ok: count("200")?,
            throttled: count("429")?,
            closed: count("closed")?,
            other: count("other")?,
            keys,
        })
    }
}

/// Asks for `pod`'s role list until it is answered (the agent has the pod), as a pod's first request
/// would; returns how many requests that took, each a request the pod's budget counted.
async fn requests_until_served(pod: &Pod, container: &Path) -> Result<u64> {
    let mut requests = 0;
    let served = eventually(|| {
        requests += 1;
        async {
            curl(pod, container, &[ROLE_LIST])
                .await
                .is_ok_and(|reply| status_of(&reply) == 200)
        }
    })
    .await;
    anyhow::ensure!(served, "the pod's role list was never served");
    Ok(requests)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_pod_gets_its_budget_and_cap_while_a_quiet_pod_gets_every_answer() -> Result<()> {
    if !privileged::can_run("per-pod limits") || !privileged::has_python_tools("per-pod limits") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (flooder, quiet) = (node.pod()?, node.pod()?);
    let (flooding_a, flooding_b, asking) = (flooder.container()?, flooder.container()?, quiet.container()?);
    let cluster = KubeNode::start(
        node,
        Sts::Moto,
        &[
            "--pod-request-rate",
            &RATE.to_string(),
            "--pod-request-burst",
            &BURST.to_string(),
            "--max-connections-per-pod",
            &CONNECTIONS_PER_POD.to_string(),
        ],
    )?;
    cluster
        .api
        .apply_pod(pod_object(&flooder, "load", "flood", &[(ROLE_KEY, "app-flood")]));
    cluster
        .api
        .apply_pod(pod_object(&quiet, "shop", "quiet", &[(ROLE_KEY, "app-quiet")]));

    // Requests: both containers of the flooder, 24 each over 4 connections (48 against a budget of
    // 20, well within the connection cap); the quiet pod, 10 on one connection (within its own 20).
    let started = Instant::now();
    let warm_up = requests_until_served(&flooder, &flooding_a).await?;
    let warm_up_quiet = requests_until_served(&quiet, &asking).await?;
    let (a, b, asked) = tokio::join!(
        flood(&flooder, &flooding_a, "app-flood", 4, 24),
        flood(&flooder, &flooding_b, "app-flood", 4, 24),
        flood(&quiet, &asking, "app-quiet", 1, 10),
    );
    let (a, b, asked) = (a?, b?, asked?);
    let elapsed = started.elapsed();
    println!("flood: {a:?} {b:?}; quiet: {asked:?}; warm-up {warm_up}+{warm_up_quiet} requests; {elapsed:?}");

    assert_eq!(
        (asked.ok, asked.throttled, asked.closed, asked.other),
        (10, 0, 0, 0),
        "the quiet pod gets every answer"
    );
    assert_eq!(asked.keys.len(), 1, "{asked:?}");
    let (ok, throttled) = (a.ok + b.ok, a.throttled + b.throttled);
    assert_eq!((a.closed + b.closed, a.other + b.other), (0, 0), "{a:?} {b:?}");
    assert_eq!(ok + throttled, 48);
    // The pod's budget between `started` and now: the burst, and what refilled meanwhile. Its
    // warm-up requests came out of it too. Each container alone would have had a burst of its own.
    // (A run taking 19 s, not the few it takes, would blur the last bound.)
    let admitted = ok + warm_up;
    let refilled = RATE * (elapsed.as_secs() + 1);
    assert!(admitted >= BURST, "the whole burst is served: {admitted}");
    assert!(admitted <= BURST + refilled, "{admitted} admitted in {elapsed:?}");
    assert!(
        admitted < 2 * BURST,
        "the containers share one budget: {admitted}"
    );
    assert!(throttled > 0);
    let flood_keys: BTreeSet<&String> = a.keys.iter().chain(&b.keys).collect();
    assert_eq!(flood_keys.len(), 1, "the flood's own credentials: {flood_keys:?}");
    assert!(
        !flood_keys.contains(&asked.keys[0]),
        "the flood never gets the quiet pod's credentials"
    );

    // Every refusal counted, and logged at info once for the whole flood (once per 10 s per pod).
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    assert_eq!(
        sample_value(
            &metrics,
            r#"interceptor_metadata_refusals_total{reason="throttled"}"#
        ),
        throttled as f64
    );
    let throttle_lines = cluster
        .agent
        .logs()
        .iter()
        .filter(|line| line.contains("over their caller's rate limit") && line.contains(&flooder.uid))
        .count();
    let allowed_lines = 1 + elapsed.as_secs() / 10;
    assert!(
        (1..=allowed_lines as usize).contains(&throttle_lines),
        "{throttle_lines} throttle lines"
    );

    // Connections: one container opens 24 connections and holds them, sending nothing. Past the pod's
    // 16 they are closed at accept, and from the first closed on the kernel refuses that container's
    // connects (EPERM) without the agent; the other container's are closed and refused the same way,
    // while the quiet pod is served.
    let refusals = |metrics: &str| {
        sample_value(
            metrics,
            r#"interceptor_metadata_connections_refused_total{reason="caller_limit"}"#,
        ) + sample_value(
            metrics,
            r#"interceptor_bpf_connections_total{outcome="over_limit"}"#,
        )
    };
    let refused_before = refusals(&metrics);
    let mut holder = pod_command(
        &flooder,
        &flooding_a,
        &["hold", &format!("{METADATA_IP}:80"), "--count", "24"],
    )?;
    let held = holder.line().await?;
    let opened = bench::output_field(&held, "opened")?;
    let failed = bench::output_field(&held, "failed")?;
    assert!(
        opened >= CONNECTIONS_PER_POD as f64 && opened + failed == 24.0,
        "{held}: some connects complete before the agent's accept finds the pod over its cap"
    );
    let over_cap = (24 - CONNECTIONS_PER_POD) as f64;
    assert!(
        eventually(|| async {
            health(&cluster.node, "/metrics")
                .await
                .is_ok_and(|(_, metrics)| refusals(&metrics) >= refused_before + over_cap)
        })
        .await,
        "the holder's connections past the cap were neither closed nor refused"
    );
    let kernel_refused = |metrics: &str| {
        sample_value(
            metrics,
            r#"interceptor_bpf_connections_total{outcome="over_limit"}"#,
        )
    };
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    let kernel_refused_before = kernel_refused(&metrics);
    let other_container = flood(&flooder, &flooding_b, "app-flood", 1, 3).await?;
    assert_eq!(
        (other_container.ok, other_container.closed),
        (0, 3),
        "{other_container:?}"
    );
    // Its first connection closed at accept gated it: the kernel refused the next two.
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    assert!(
        kernel_refused(&metrics) >= kernel_refused_before + 2.0,
        "the kernel did not refuse the other container's connects"
    );
    let quiet_again = flood(&quiet, &asking, "app-quiet", 1, 3).await?;
    assert_eq!((quiet_again.ok, quiet_again.keys), (3, asked.keys));
    holder.finish().await?;
    // Let go, the pod's connections are admitted again.
    assert!(
        eventually(|| async {
            flood(&flooder, &flooding_b, "app-flood", 1, 1)
                .await
                .is_ok_and(|reply| reply.ok == 1)
        })
        .await
    );
    Ok(())
}

/// The global cap tried as pods holding connections would: `--max-connections 16
/// --max-connections-per-pod 8`, so that two pods at their caps would fill it. The first pod holds its
/// 8; the second asks for 8 and is admitted 4, as past 12 open (three quarters) only pods holding
/// fewer than 4 are; a third pod, arriving last, is still served on connections of its own.
#[tokio::test(flavor = "multi_thread")]
async fn pods_holding_their_caps_leave_a_newcomer_connections_of_its_own() -> Result<()> {
    if !privileged::can_run("fair global connection cap") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (first, second, newcomer) = (node.pod()?, node.pod()?, node.pod()?);
    let containers = (first.container()?, second.container()?, newcomer.container()?);
    let cluster = KubeNode::start(
        node,
        Sts::Down,
        &["--max-connections", "16", "--max-connections-per-pod", "8"],
    )?;
    for (pod, name) in [(&first, "first"), (&second, "second"), (&newcomer, "newcomer")] {
        cluster.api.apply_pod(pod_object(
            pod,
            "load",
            name,
            &[(ROLE_KEY, &format!("app-{name}"))],
        ));
    }
    requests_until_served(&newcomer, &containers.2).await?;

    let hold = |pod, container| {
        pod_command(
            pod,
            container,
            &["hold", &format!("{METADATA_IP}:80"), "--count", "8"],
        )
    };
    let mut holders = Vec::new();
    for (pod, container) in [(&first, &containers.0), (&second, &containers.1)] {
        let mut holder = hold(pod, container)?;
        let held = holder.line().await?;
        assert_eq!(bench::output_field(&held, "opened")?, 8.0, "{held}");
        holders.push(holder);
    }
    // 12 kept: the first pod's 8 and the second's 4; the second's last 4 closed at accept.
    let reserved = r#"interceptor_metadata_connections_refused_total{reason="reserved"}"#;
    assert!(
        eventually(|| async {
            health(&cluster.node, "/metrics")
                .await
                .is_ok_and(|(_, metrics)| sample_value(&metrics, reserved) >= 4.0)
        })
        .await,
        "the second pod's connections past its guarantee were not refused"
    );
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    assert_eq!(sample_value(&metrics, reserved), 4.0);
    assert_eq!(
        sample_value(
            &metrics,
            r#"interceptor_metadata_connections_refused_total{reason="global_limit"}"#
        ),
        0.0
    );

    let asked = flood(&newcomer, &containers.2, "", 2, 6).await?;
    assert_eq!((asked.ok, asked.closed, asked.other), (6, 0, 0), "{asked:?}");
    for holder in holders {
        holder.finish().await?;
    }
    Ok(())
}

/// A client in `pod`'s `container` that the test talks to line by line.
fn pod_command(pod: &Pod, container: &Path, args: &[&str]) -> Result<Interactive> {
    let mut command = pod.command(container, SIM_CLIENT)?;
    command.args(args);
    Interactive::spawn(command)
}
