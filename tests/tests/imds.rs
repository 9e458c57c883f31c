//! The agent's metadata API end to end, everything but STS: the real agent binary in a simulated node,
//! curl in simulated pods, the stand-in on 169.254.169.254 as the node's metadata service. STS is
//! unreachable here (these tests also run in the kernel matrix, where moto is too slow to start);
//! credentials themselves are tested in `credentials.rs`.

use interceptor_tests::{
    agent::{Agent, WorkloadFile},
    deployed::{DeployedNode, IMDS, ROLE_LIST, Sts, body_of, curl, eventually, header_of, status_of},
    lab::StandIn,
    privileged,
    sim::SimNode,
};

const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";

fn can_run(test: &str) -> bool {
    privileged::can_run(test)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_with_the_status_of_the_protocol() -> anyhow::Result<()> {
    if !can_run("imds statuses") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (pod_a, pod_b) = (node.pod()?, node.pod()?);
    let (a, b) = (pod_a.container()?, pod_b.container()?);
    let t = DeployedNode::start(
        node,
        &[(pod_a.slice(), "alpha"), (pod_b.slice(), "beta")],
        Sts::Down,
        &[],
    )?;
    let get = |url: &str| format!("{IMDS}{url}");

    // v2 token: the TTL is echoed in the header the SDKs read.
    let minted = curl(
        &pod_a,
        &a,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("{TTL_HEADER}: 300"),
            &get("/latest/api/token"),
        ],
    )
    .await?;
    assert_eq!(status_of(&minted), 200, "{minted}");
    assert_eq!(
        header_of(&minted, "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"),
        Some("300")
    );
    assert_eq!(header_of(&minted, "Server"), Some("EC2ws"));
    let token = body_of(&minted).to_owned();
    let with_token = format!("X-aws-ec2-metadata-token: {token}");

    // The role list, with and without the slash, with the token and without (v1).
    for url in [ROLE_LIST, ROLE_LIST.trim_end_matches('/')] {
        let listed = curl(&pod_a, &a, &["-H", &with_token, url]).await?;
        assert_eq!((status_of(&listed), body_of(&listed)), (200, "alpha"), "{url}");
        let v1 = curl(&pod_a, &a, &[url]).await?;
        assert_eq!((status_of(&v1), body_of(&v1)), (200, "alpha"), "{url}");
    }

    // Another role's name gets 404 and no keys, before STS is asked.
    let other_role = curl(&pod_a, &a, &[&format!("{ROLE_LIST}beta")]).await?;
    assert_eq!(status_of(&other_role), 404);
    assert!(!other_role.contains("AccessKeyId"));
    let info = curl(&pod_a, &a, &[&get("/latest/meta-data/iam/info")]).await?;
    assert!(body_of(&info).contains("instance-profile/alpha"), "{info}");

    // A token minted in pod A is refused in pod B.
    let stolen = curl(&pod_b, &b, &["-H", &with_token, ROLE_LIST]).await?;
    assert_eq!(status_of(&stolen), 401, "{stolen}");

    // Token requests: bad TTL, through a proxy, at a versioned path.
    for (args, status) in [
        (
            vec!["-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 0"],
            400,
        ),
        (vec!["-X", "PUT"], 400),
        (
            vec![
                "-X",
                "PUT",
                "-H",
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
                "-H",
                "X-Forwarded-For: 10.0.0.1",
            ],
            403,
        ),
    ] {
        let mut args = args;
        let url = get("/latest/api/token");
        args.push(&url);
        assert_eq!(status_of(&curl(&pod_a, &a, &args).await?), status, "{args:?}");
    }
    let versioned = curl(
        &pod_a,
        &a,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            &get("/2021-03-23/api/token"),
        ],
    )
    .await?;
    assert_eq!(status_of(&versioned), 403);
    let post = curl(&pod_a, &a, &["-X", "POST", ROLE_LIST]).await?;
    assert_eq!(status_of(&post), 405);

    // Node-only paths are refused; allowed instance facts are proxied.
    for path in [
        "/latest/user-data",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/latest/dynamic/instance-identity/signature",
    ] {
        let refused = curl(&pod_a, &a, &[&get(path)]).await?;
        assert_eq!(status_of(&refused), 403, "{path}");
        assert!(!refused.contains(StandIn::NODE_SECRET));
    }
    let proxied = curl(&pod_a, &a, &[&get("/latest/meta-data/instance-id")]).await?;
    assert_eq!(
        (status_of(&proxied), body_of(&proxied)),
        (200, StandIn::INSTANCE_ID)
    );

    // A connection made straight to the agent's port, not through 169.254.169.254: a workload's is
    // refused by the kernel at connect, and one from outside the workload tree gets 403.
    let direct_url = format!(
        "http://{}/latest/meta-data/iam/security-credentials/",
        t.node.agent_v4()
    );
    let from_workload = curl(&pod_a, &a, &[&direct_url]).await;
    assert!(
        from_workload
            .as_ref()
            .is_err_and(|err| err.to_string().contains("Couldn't connect")),
        "{from_workload:?}"
    );
    let outside = t.node.cgroup("system.slice/direct.service")?;
    let direct = curl(&pod_a, &outside, &[&direct_url]).await?;
    assert_eq!(status_of(&direct), 403, "{direct}");

    // The stand-in heard only the agent's own token request and the one allowed fact.
    let heard: Vec<String> = t.stand_in.metadata_paths();
    assert!(
        heard
            .iter()
            .all(|path| path == "/latest/api/token" || path == "/latest/meta-data/instance-id"),
        "{heard:?}"
    );
    assert!(heard.contains(&"/latest/meta-data/instance-id".to_owned()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn imdsv2_can_be_required() -> anyhow::Result<()> {
    if !can_run("imdsv2 required") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let _t = DeployedNode::start(node, &[(pod.slice(), "alpha")], Sts::Down, &["--require-imdsv2"])?;
    assert_eq!(status_of(&curl(&pod, &container, &[ROLE_LIST]).await?), 401);
    let minted = curl(
        &pod,
        &container,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("{TTL_HEADER}: 60"),
            &format!("{IMDS}/latest/api/token"),
        ],
    )
    .await?;
    let with_token = format!("X-aws-ec2-metadata-token: {}", body_of(&minted));
    let listed = curl(&pod, &container, &["-H", &with_token, ROLE_LIST]).await?;
    assert_eq!((status_of(&listed), body_of(&listed)), (200, "alpha"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn workloads_sharing_one_ip_get_their_own_roles() -> anyhow::Result<()> {
    if !can_run("shared ip") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let first = node.pod()?;
    let second = node.pod_sharing(&first)?;
    let (c1, c2) = (first.container()?, second.container()?);
    let _t = DeployedNode::start(
        node,
        &[(first.slice(), "first"), (second.slice(), "second")],
        Sts::Down,
        &[],
    )?;

    for (pod, container, role, other) in [
        (&first, &c1, "first", "second"),
        (&second, &c2, "second", "first"),
    ] {
        let listed = curl(pod, container, &[ROLE_LIST]).await?;
        assert_eq!(body_of(&listed), role);
        let info = curl(
            pod,
            container,
            &["http://169.254.169.254/latest/meta-data/iam/info"],
        )
        .await?;
        assert!(
            body_of(&info).contains(&format!("instance-profile/{role}")),
            "{info}"
        );
        let wrong = curl(pod, container, &[&format!("{ROLE_LIST}{other}")]).await?;
        assert_eq!(status_of(&wrong), 404);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workload_file_is_reloaded_and_a_bad_one_keeps_the_last_good_one() -> anyhow::Result<()> {
    if !can_run("workload reload") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let t = DeployedNode::start(node, &[(pod.slice(), "before")], Sts::Down, &[])?;
    let role =
        || async { body_of(&curl(&pod, &container, &[ROLE_LIST]).await.unwrap_or_default()).to_owned() };
    assert_eq!(role().await, "before");

    t.workloads.write(&[(pod.slice(), "after")])?;
    assert!(
        eventually(|| async { role().await == "after" }).await,
        "the new file never took effect"
    );

    t.workloads.write_raw("[[workload]]\nthis is not toml")?;
    t.agent.wait_for_log("workload file not reloaded")?;
    assert_eq!(role().await, "after");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_discovery_takes_the_base_arn_and_the_default_role_from_the_node() -> anyhow::Result<()> {
    if !can_run("auto discovery") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let stand_in = StandIn::start(&node)?;
    let workloads = WorkloadFile::new(&[])?;
    let mount = interceptor::identity::cgroup2_mount()?;
    let relative = pod.slice().strip_prefix(&mount)?.display().to_string();
    // An entry without a role: the default role applies.
    workloads.write_raw(&format!(
        "[[workload]]\nname = \"plain\"\ncgroup = \"{relative}\"\n"
    ))?;
    let mut command = Agent::command(&node)?;
    Agent::node_flags(&mut command, &node, &workloads.path())
        .args(["--auto-discover-base-arn", "--auto-discover-default-role"]);
    let _agent = Agent::start(command)?;

    let listed = curl(&pod, &container, &[ROLE_LIST]).await?;
    assert_eq!((status_of(&listed), body_of(&listed)), (200, StandIn::NODE_ROLE));
    let info = curl(&pod, &container, &[&format!("{IMDS}/latest/meta-data/iam/info")]).await?;
    assert!(
        body_of(&info).contains("arn:aws:iam::210987654321:instance-profile/node-role"),
        "the discovered account and role: {info}"
    );
    // Only the agent asked the node, at start-up, through its own token.
    let heard = stand_in.metadata_paths();
    for path in [
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials/",
    ] {
        assert_eq!(heard.iter().filter(|p| *p == path).count(), 1, "{heard:?}");
    }
    Ok(())
}
