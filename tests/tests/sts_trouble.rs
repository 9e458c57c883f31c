//! STS in trouble end to end: the real agent in a simulated node, with moto as STS behind a proxy that
//! stops answering after the first credentials are served. A pod with a cached set still gets it at
//! once; a pod whose session has none gets a 503 with Retry-After when the agent's call times out, and
//! never a key. STS throttling is answered the same way, and counted apart from other errors.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::creds::STS_CALL_TIMEOUT;
use interceptor_tests::{
    deployed::{DeployedNode, ROLE_LIST, Sts, body_of, curl, header_of, status_of},
    moto::MOTO_PORT,
    privileged,
    sim::{NODE_IP, Pod, SimNode},
    sts_proxy::{StsMode, StsProxy},
};

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

/// Asks for `role`'s credentials from `container`: the `curl -i` output and how long it took.
async fn credentials(
    pod: &Pod,
    container: &std::path::Path,
    role: &str,
) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let reply = curl(pod, container, &[&format!("{ROLE_LIST}{role}")]).await?;
    Ok((reply, started.elapsed()))
}

fn access_key(reply: &str) -> anyhow::Result<String> {
    let doc: serde_json::Value = serde_json::from_str(body_of(reply))?;
    Ok(doc["AccessKeyId"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn when_sts_hangs_a_cached_set_is_served_at_once_and_a_new_session_gets_a_503() -> anyhow::Result<()> {
    if !can_run("sts hangs") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (cached, new) = (node.pod()?, node.pod()?);
    let (cached_container, new_container) = (cached.container()?, new.container()?);
    let proxy = StsProxy::start(&node, SocketAddr::from((NODE_IP, MOTO_PORT)))?;
    let sts_url = proxy.url();
    let t = DeployedNode::start(
        node,
        &[(cached.slice(), "cached"), (new.slice(), "new")],
        Sts::Moto,
        &["--sts-endpoint", &sts_url],
    )?;

    let (first, _) = credentials(&cached, &cached_container, "cached").await?;
    assert_eq!(status_of(&first), 200, "{first}");
    let key = access_key(&first)?;
    assert!(key.starts_with("ASIA"), "{first}");
    assert_eq!(t.moto().assume_role_calls()?, 1);

    proxy.set_mode(StsMode::Hang);

    // (a) The cached set, still fit, is served as before: within botocore's 1 s.
    let (again, took) = credentials(&cached, &cached_container, "cached").await?;
    assert_eq!(status_of(&again), 200, "{again}");
    assert_eq!(access_key(&again)?, key);
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // (b) A session with no set waits for the agent's call to time out, then hears 503.
    let (refused, took) = credentials(&new, &new_container, "new").await?;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(header_of(&refused, "Retry-After").is_some(), "{refused}");
    assert!(
        !refused.contains("AccessKeyId") && !refused.contains("ASIA"),
        "{refused}"
    );
    assert!(
        took >= STS_CALL_TIMEOUT && took < STS_CALL_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(
        proxy.handled(StsMode::Hang) >= 1,
        "the agent's call never reached the hung STS"
    );
    assert_eq!(
        t.moto().assume_role_calls()?,
        1,
        "a call got through the hung proxy"
    );
    t.agent.wait_for_log("no answer within 2s")?;
    Ok(())
}

/// STS answering `Throttling` (over the account's request rate): the pod gets a 503 with Retry-After,
/// never a key, and the refusal and the STS call are counted as throttled, apart from other errors.
/// `--sts-timeout` leaves the SDK room for its own retries, so the answer is the throttling, not a
/// timeout.
#[tokio::test(flavor = "multi_thread")]
async fn when_sts_throttles_a_new_session_gets_a_503_counted_as_throttled() -> anyhow::Result<()> {
    if !can_run("sts throttles") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let proxy = StsProxy::start(&node, SocketAddr::from((NODE_IP, MOTO_PORT)))?;
    proxy.set_mode(StsMode::Throttle);
    let sts_url = proxy.url();
    let t = DeployedNode::start(
        node,
        &[(pod.slice(), "busy")],
        Sts::Moto,
        &["--sts-endpoint", &sts_url, "--sts-timeout", "30s"],
    )?;

    let (refused, _) = credentials(&pod, &container, "busy").await?;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(header_of(&refused, "Retry-After").is_some(), "{refused}");
    assert!(!refused.contains("ASIA"), "{refused}");
    assert!(proxy.handled(StsMode::Throttle) >= 1);
    let (_, metrics) = t.health("/metrics").await?;
    for sample in [
        r#"interceptor_metadata_refusals_total{reason="sts_throttled"} 1"#,
        r#"interceptor_sts_assume_role_total{role="arn:aws:iam::123456789012:role/busy",result="throttled"} 1"#,
    ] {
        assert!(metrics.lines().any(|line| line == sample), "{sample}\n{metrics}");
    }
    assert!(!metrics.contains(r#"result="error""#), "{metrics}");
    Ok(())
}
