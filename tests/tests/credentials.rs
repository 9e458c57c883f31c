//! Credentials end to end: the real agent in a simulated node with moto as STS, requests from simulated
//! pods; AssumeRole calls counted where they arrive, at moto.

use interceptor_tests::{
    deployed::{DeployedNode, ROLE_LIST, Sts, body_of, curl, header_of, status_of},
    lab::{StandIn, run},
    privileged,
    sim::SimNode,
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_and_extended_credentials_for_each_workload_behind_one_ip() -> anyhow::Result<()> {
    if !can_run("credentials") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let first = node.pod()?;
    let second = node.pod_sharing(&first)?;
    let (c1, c2) = (first.container()?, second.container()?);
    let t = DeployedNode::start(
        node,
        &[(first.slice(), "first"), (second.slice(), "second")],
        Sts::Moto,
        &[],
    )?;

    let mut keys = Vec::new();
    for (pod, container, role) in [(&first, &c1, "first"), (&second, &c2, "second")] {
        let creds = curl(pod, container, &[&format!("{ROLE_LIST}{role}")]).await?;
        assert_eq!(status_of(&creds), 200, "{creds}");
        let doc: serde_json::Value = serde_json::from_str(body_of(&creds))?;
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["Type"], "AWS-HMAC");
        for field in [
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "LastUpdated",
            "Expiration",
        ] {
            assert!(
                doc[field].as_str().is_some_and(|value| !value.is_empty()),
                "{field}: {doc}"
            );
        }
        assert!(doc.get("AccountId").is_none());
        let extended = curl(
            pod,
            container,
            &[&format!(
                "http://169.254.169.254/latest/meta-data/iam/security-credentials-extended/{role}"
            )],
        )
        .await?;
        let extended: serde_json::Value = serde_json::from_str(body_of(&extended))?;
        assert_eq!(extended["AccountId"], "123456789012");
        assert_eq!(
            extended["AccessKeyId"], doc["AccessKeyId"],
            "one session, one cached set"
        );
        keys.push(doc["AccessKeyId"].as_str().unwrap_or_default().to_owned());
    }
    assert_ne!(
        keys[0], keys[1],
        "two workloads behind one IP got the same credentials"
    );
    assert_eq!(t.moto().assume_role_calls()?, 2);
    for (pod, container) in [(&first, &c1), (&second, &c2)] {
        t.agent
            .assert_no_secret_logged(&t.secrets_served_to(pod, container).await?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_first_requests_make_one_assume_role_call() -> anyhow::Result<()> {
    if !can_run("concurrent first requests") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let t = DeployedNode::start(node, &[(pod.slice(), "busy")], Sts::Moto, &[])?;
    assert_eq!(t.moto().assume_role_calls()?, 0);

    let mut command = pod.command(&container, SIM_CLIENT)?;
    command.args([
        "concurrent-get",
        "169.254.169.254:80",
        "--path",
        "/latest/meta-data/iam/security-credentials/busy",
        "--count",
        "100",
    ]);
    let lines = run(command).await?;
    let replies: Vec<&str> = lines.lines().collect();
    assert_eq!(replies.len(), 100);
    let first_key = replies[0].split_whitespace().nth(1).unwrap_or("-");
    assert_ne!(first_key, "-", "{}", replies[0]);
    for reply in &replies {
        assert_eq!(*reply, format!("200 {first_key}"));
    }
    assert_eq!(
        t.moto().assume_role_calls()?,
        1,
        "moto saw this many AssumeRole calls"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_is_a_503_with_retry_after_and_never_other_credentials() -> anyhow::Result<()> {
    if !can_run("sts down") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let t = DeployedNode::start(node, &[(pod.slice(), "alpha")], Sts::Down, &[])?;

    let reply = curl(&pod, &container, &[&format!("{ROLE_LIST}alpha")]).await?;
    assert_eq!(status_of(&reply), 503, "{reply}");
    assert!(header_of(&reply, "Retry-After").is_some(), "{reply}");
    assert!(
        !reply.contains("AccessKeyId") && !reply.contains(StandIn::NODE_SECRET),
        "{reply}"
    );
    assert!(
        !t.stand_in
            .metadata_paths()
            .iter()
            .any(|path| path.contains("security-credentials")),
        "the node's credentials were asked for"
    );
    // Refused connects fail fast, but the SDK retries them with jittered backoff: whether its last
    // error or the agent's --sts-timeout comes first is chance. Either way the 503 is STS's.
    t.agent.wait_for_log(r#""reason":"sts_"#)?;
    Ok(())
}
