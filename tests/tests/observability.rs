//! What an operator sees of the agent: `/metrics` moves by exactly what the pods did, `/readyz` follows
//! the start-up, the JSON request log holds one line per request with who, what and why, and no log line
//! ever holds a secret the agent served.

use std::collections::BTreeMap;

use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN, WorkloadFile},
    deployed::{DeployedNode, IMDS, ROLE_LIST, Sts, body_of, curl, health, put_token, status_of},
    exposition::Samples,
    privileged,
    sim::SimNode,
};

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_not_ready_until_the_workloads_are_synced_and_the_programs_attached() -> anyhow::Result<()>
{
    if !can_run("readiness") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let workloads = WorkloadFile::new(&[])?;
    let pending = workloads.path().with_file_name("not-yet.toml");
    let mut command = Agent::command(&node)?;
    Agent::node_flags(&mut command, &node, &pending).args(["--base-role-arn", BASE_ROLE_ARN]);
    let agent = Agent::start_until(command, "waiting for the workload file to appear")?;

    assert_eq!(health(&node, "/healthz").await?.0, 200);
    let (status, body) = health(&node, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("not attached") && body.contains("not synced"),
        "{body}"
    );
    // Prometheus sees the same checks: the gauge the InterceptorAgentNotReady alert reads.
    let readiness = |metrics: &str, check: &str| {
        let prefix = format!("interceptor_readiness{{check=\"{check}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
    };
    let (_, metrics) = health(&node, "/metrics").await?;
    assert_eq!(
        readiness(&metrics, "bpf_attached").as_deref(),
        Some("0"),
        "{metrics}"
    );
    assert_eq!(
        readiness(&metrics, "workloads_synced").as_deref(),
        Some("0"),
        "{metrics}"
    );

    std::fs::copy(workloads.path(), &pending)?;
    agent.wait_for_log("\"message\":\"ready\"")?;
    let (status, body) = health(&node, "/readyz").await?;
    assert_eq!((status, body.as_str()), (200, "ready"));
    let (_, metrics) = health(&node, "/metrics").await?;
    for check in ["bpf_attached", "workloads_synced", "node_credentials"] {
        assert_eq!(
            readiness(&metrics, check).as_deref(),
            Some("1"),
            "{check}: {metrics}"
        );
    }
    Ok(())
}

/// `name{labels}` for the metrics the script moves.
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels = labels.to_vec();
    labels.sort();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("interceptor_{name}{{{}}}", labels.join(","))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_request_logs_follow_a_scripted_set_of_requests() -> anyhow::Result<()> {
    if !can_run("metrics and logs") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (known, stranger) = (node.pod()?, node.pod()?);
    let (a, b) = (known.container()?, stranger.container()?);
    let t = DeployedNode::start(node, &[(known.slice(), "alpha")], Sts::Moto, &[])?;
    let (status, exposition) = t.health("/metrics").await?;
    assert_eq!(status, 200);
    let before = Samples::parse(&exposition)?;

    // The script: 10 redirected connections from the pods, 1 made straight to the agent from outside
    // the workload tree, and 1 from a workload that the kernel refuses.
    let token = put_token(&known, &a).await?;
    assert_eq!(status_of(&token), 200);
    for _ in 0..2 {
        assert_eq!(status_of(&curl(&known, &a, &[ROLE_LIST]).await?), 200);
    }
    let mut secrets = Vec::new();
    for _ in 0..3 {
        let creds = curl(&known, &a, &[&format!("{ROLE_LIST}alpha")]).await?;
        assert_eq!(status_of(&creds), 200);
        let doc: serde_json::Value = serde_json::from_str(body_of(&creds))?;
        secrets.push(doc["SecretAccessKey"].as_str().unwrap_or_default().to_owned());
        secrets.push(doc["Token"].as_str().unwrap_or_default().to_owned());
    }
    secrets.push(body_of(&token).to_owned());
    assert_eq!(
        status_of(&curl(&known, &a, &[&format!("{ROLE_LIST}beta")]).await?),
        404
    );
    assert_eq!(
        status_of(&curl(&known, &a, &["-H", "X-aws-ec2-metadata-token: forged", ROLE_LIST]).await?),
        401
    );
    assert_eq!(
        status_of(&curl(&known, &a, &[&format!("{IMDS}/latest/user-data")]).await?),
        403
    );
    assert_eq!(status_of(&curl(&stranger, &b, &[ROLE_LIST]).await?), 404);
    let direct = format!("http://{}/latest/meta-data/", t.node.agent_v4());
    let outside = t.node.cgroup("system.slice/direct.service")?;
    assert_eq!(status_of(&curl(&known, &outside, &[&direct]).await?), 403);
    assert!(
        curl(&known, &a, &[&direct]).await.is_err(),
        "the kernel refuses a workload's connection straight to the agent"
    );

    let (_, exposition) = t.health("/metrics").await?;
    let after = Samples::parse(&exposition)?;
    let delta = after.delta(&before);
    let role = format!("{BASE_ROLE_ARN}alpha");
    let expected: BTreeMap<String, f64> = [
        (
            key(
                "metadata_requests_total",
                &[("route", "token"), ("status", "200")],
            ),
            1.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "role_list"), ("status", "200")],
            ),
            2.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "credentials"), ("status", "200")],
            ),
            3.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "credentials"), ("status", "404")],
            ),
            1.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "unrouted"), ("status", "401")],
            ),
            0.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "role_list"), ("status", "401")],
            ),
            1.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "unrouted"), ("status", "403")],
            ),
            2.0,
        ),
        (
            key(
                "metadata_requests_total",
                &[("route", "role_list"), ("status", "404")],
            ),
            1.0,
        ),
        (key("metadata_refusals_total", &[("reason", "other_role")]), 1.0),
        (key("metadata_refusals_total", &[("reason", "bad_token")]), 1.0),
        (key("metadata_refusals_total", &[("reason", "node_secret")]), 1.0),
        (
            key("metadata_refusals_total", &[("reason", "unknown_workload")]),
            1.0,
        ),
        (key("metadata_refusals_total", &[("reason", "unattributed")]), 1.0),
        (key("credentials_served_total", &[("role", &role)]), 3.0),
        (
            key("sts_assume_role_total", &[("result", "success"), ("role", &role)]),
            1.0,
        ),
        (
            key("sts_assume_role_duration_seconds_count", &[("role", &role)]),
            1.0,
        ),
        (key("credential_cache_lookups_total", &[("result", "miss")]), 1.0),
        (key("credential_cache_lookups_total", &[("result", "hit")]), 2.0),
        (key("credential_sessions", &[]), 1.0),
        (key("metadata_connections_total", &[("attributed", "true")]), 10.0),
        (key("metadata_connections_total", &[("attributed", "false")]), 1.0),
        (key("bpf_connections_total", &[("outcome", "redirected")]), 10.0),
        (
            key("bpf_connections_total", &[("outcome", "direct_refused")]),
            1.0,
        ),
    ]
    .into_iter()
    .filter(|(_, change)| *change != 0.0)
    .collect();
    for (sample, change) in &expected {
        assert_eq!(
            delta.get(sample),
            Some(change),
            "{sample}; all changes: {delta:#?}"
        );
    }
    // Nothing else counted requests, refusals or STS calls.
    let counted = |prefix: &str| -> f64 {
        delta
            .iter()
            .filter(|(sample, _)| sample.starts_with(prefix))
            .map(|(_, change)| change)
            .sum()
    };
    assert_eq!(counted("interceptor_metadata_requests_total"), 11.0);
    assert_eq!(counted("interceptor_metadata_refusals_total"), 5.0);
    assert_eq!(counted("interceptor_sts_assume_role_total"), 1.0);
    assert_eq!(
        counted("interceptor_metadata_request_duration_seconds_count"),
        11.0
    );
    assert_eq!(after.get("interceptor_workloads{}"), 1.0);
    assert_eq!(after.get("interceptor_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(after.get("interceptor_bpf_map_entries{map=\"connects_by_cookie\"}") >= 0.0);

    // One JSON line per request, with who, what and why; no secret in any line.
    let is_request = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|entry| entry["message"] == "metadata request")
    };
    let lines = t.agent.wait_for_lines(11, is_request);
    let requests: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line))
        .collect::<Result<_, _>>()?;
    assert_eq!(requests.len(), 11, "{:#?}", t.agent.logs());
    for entry in &requests {
        for field in ["route", "status", "latency_us", "path", "peer"] {
            assert!(!entry[field].is_null(), "{field} missing: {entry}");
        }
    }
    let served: Vec<&serde_json::Value> = requests
        .iter()
        .filter(|entry| entry["route"] == "credentials" && entry["status"] == 200)
        .collect();
    assert_eq!(served.len(), 3);
    for entry in served {
        assert_eq!(entry["workload"], "static/alpha");
        assert_eq!(entry["role"], role.as_str());
        assert!(entry["cgroup_id"].as_u64().is_some_and(|id| id > 0));
        assert!(entry["reason"].is_null());
    }
    let unknown = requests
        .iter()
        .find(|entry| entry["reason"] == "unknown_workload")
        .expect("the stranger's request is logged");
    assert_eq!(unknown["status"], 404);
    assert!(unknown["cgroup_id"].as_u64().is_some());
    let unattributed = requests
        .iter()
        .find(|entry| entry["reason"] == "unattributed")
        .expect("the direct request is logged");
    assert!(unattributed["cgroup_id"].is_null());
    t.agent.assert_no_secret_logged(&secrets);
    Ok(())
}
