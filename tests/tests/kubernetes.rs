//! The Kubernetes workload source end to end: the real agent on a simulated node, reading pods,
//! namespaces and ServiceAccounts from the fake API server in the node, while pods (real cgroups named
//! as the kubelet names them, real network namespaces) ask for their role. Each test checks what a pod
//! gets and what it must never get: another pod's role, the default role in place of a refusal, or
//! anything for a pod that is gone, finished, elsewhere or not known.
//!
//! Only the tests that fetch credentials need Python (the AWS CLI, moto as STS); the others read the
//! role list, which needs no STS, so they also run in the kernel matrix.

use std::time::Duration;

use interceptor_tests::{
    agent::Agent,
    bench::output_field,
    deployed::{
        ROLE_LIST, Sts, aws_cli_caller_arn, body_of, curl, eventually, header_of, role_list,
        role_list_becomes, status_of,
    },
    kube_node::{
        KubeNode, NODE_NAME, OTHER_NODE, namespace_object, node_object, pod_object, service_account_object,
    },
    lab::run,
    privileged,
    sim::{NODE_IP, Pod, SimNode},
};

const ROLE_KEY: &str = "iam.amazonaws.com/role";

fn can_run(test: &str) -> bool {
    privileged::can_run(test)
}

fn can_run_with_python(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_annotated_pod_gets_its_role_and_a_pod_sharing_its_network_never_does() -> anyhow::Result<()> {
    if !can_run_with_python("annotated pod with the AWS CLI") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let web = node.pod()?;
    // Two pods in one network namespace, as hostNetwork pods are: one IP, two identities.
    let batch = node.pod_sharing(&web)?;
    let cluster = KubeNode::start(node, Sts::Moto, &[])?;
    cluster
        .api
        .apply_pod(pod_object(&web, "shop", "web-7d9f", &[(ROLE_KEY, "app-web")]));
    cluster.api.apply_pod(pod_object(&batch, "shop", "batch-x2", &[]));
    let (web_app, batch_app) = (web.container()?, batch.container()?);

    let arn = aws_cli_caller_arn(&web, &web_app, &cluster.moto().url()).await?;
    assert_eq!(
        arn,
        "arn:aws:sts::123456789012:assumed-role/app-web/shop.web-7d9f"
    );
    // The pod's init and sidecar containers are the pod too.
    let sidecar = web.container()?;
    assert_eq!(role_list(&web, &sidecar).await?, (200, "app-web".to_owned()));

    assert_eq!(role_list(&batch, &batch_app).await?.0, 404, "no role, no default");
    let asked = curl(&batch, &batch_app, &[&format!("{ROLE_LIST}app-web")]).await?;
    assert_eq!(status_of(&asked), 404, "{asked}");
    assert_eq!(cluster.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_auto_discovered_base_arn_the_unannotated_pod_gets_the_default_role_only()
-> anyhow::Result<()> {
    if !can_run_with_python("auto-discovered base ARN") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let web = node.pod()?;
    let batch = node.pod_sharing(&web)?;
    let cluster = KubeNode::start(
        node,
        Sts::Moto,
        &["--auto-discover-base-arn", "--default-role", "fallback"],
    )?;
    cluster
        .api
        .apply_pod(pod_object(&web, "shop", "web-1", &[(ROLE_KEY, "app-web")]));
    cluster.api.apply_pod(pod_object(&batch, "shop", "batch-1", &[]));
    let (web_app, batch_app) = (web.container()?, batch.container()?);

    // The stand-in's instance profile is in account 210987654321.
    let arn = aws_cli_caller_arn(&web, &web_app, &cluster.moto().url()).await?;
    assert_eq!(arn, "arn:aws:sts::210987654321:assumed-role/app-web/shop.web-1");
    let arn = aws_cli_caller_arn(&batch, &batch_app, &cluster.moto().url()).await?;
    assert_eq!(
        arn,
        "arn:aws:sts::210987654321:assumed-role/fallback/shop.batch-1"
    );
    let asked = curl(&batch, &batch_app, &[&format!("{ROLE_LIST}app-web")]).await?;
    assert_eq!(status_of(&asked), 404, "{asked}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_elsewhere_finished_changed_or_deleted_get_what_their_object_says_now() -> anyhow::Result<()> {
    if !can_run("pod states") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (web, elsewhere, done, static_pod) = (node.pod()?, node.pod()?, node.pod()?, node.static_pod()?);
    let cluster = KubeNode::start(node, Sts::Down, &["--pod-wait", "300ms"])?;
    cluster
        .api
        .apply_pod(pod_object(&web, "shop", "web", &[(ROLE_KEY, "app-web")]));
    let mut on_other_node = pod_object(&elsewhere, "shop", "elsewhere", &[(ROLE_KEY, "app-web")]);
    on_other_node.spec.as_mut().unwrap().node_name = Some(OTHER_NODE.to_owned());
    cluster.api.apply_pod(on_other_node);
    let mut finished = pod_object(&done, "shop", "job", &[(ROLE_KEY, "app-job")]);
    finished.status.as_mut().unwrap().phase = Some("Succeeded".to_owned());
    cluster.api.apply_pod(finished);
    // A static pod's mirror has a UID of its own; its cgroup is named by the config hash.
    let mut mirror = pod_object(
        &static_pod,
        "kube-system",
        "proxy-node-a",
        &[(ROLE_KEY, "node-proxy")],
    );
    mirror.metadata.uid = None;
    mirror
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("kubernetes.io/config.mirror".to_owned(), static_pod.uid.clone());
    cluster.api.apply_pod(mirror);
    let containers = [
        web.container()?,
        elsewhere.container()?,
        done.container()?,
        static_pod.container()?,
    ];

    assert!(role_list_becomes(&web, &containers[0], (200, "app-web")).await);
    assert_eq!(
        role_list(&static_pod, &containers[3]).await?,
        (200, "node-proxy".to_owned())
    );
    // Anyone who can create pods can write a mirror annotation: a second pod object claiming the static
    // pod's hash must not hand the static pod its role. The hash names nobody while it is contested.
    let mut claimant = pod_object(&web, "shop", "claimant", &[(ROLE_KEY, "attacker-chosen")]);
    claimant.metadata.uid = None;
    claimant
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("kubernetes.io/config.mirror".to_owned(), static_pod.uid.clone());
    cluster.api.apply_pod(claimant);
    assert!(role_list_becomes(&static_pod, &containers[3], (403, "")).await);
    assert!(cluster.api.delete_pod("shop", "claimant"));
    assert!(role_list_becomes(&static_pod, &containers[3], (200, "node-proxy")).await);
    let (status, body) = role_list(&elsewhere, &containers[1]).await?;
    assert_eq!(status, 503, "another node's pod is in no store here: {body}");
    assert_eq!(
        role_list(&done, &containers[2]).await?.0,
        404,
        "a Succeeded pod gets nothing"
    );

    let mut changed = pod_object(&web, "shop", "web", &[(ROLE_KEY, "app-web-v2")]);
    changed.metadata.uid = Some(web.uid.clone());
    cluster.api.apply_pod(changed);
    assert!(role_list_becomes(&web, &containers[0], (200, "app-web-v2")).await);
    assert!(cluster.api.delete_pod("shop", "web"));
    assert!(role_list_becomes(&web, &containers[0], (404, "")).await);
    for reason in ["pod_not_known", "pod_finished", "pod_deleted", "mirror_contested"] {
        cluster.agent.wait_for_log(&format!("\"reason\":\"{reason}\""))?;
    }
    assert_eq!(cluster.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_without_a_role_takes_its_service_accounts_and_its_own_annotation_wins() -> anyhow::Result<()> {
    if !can_run("serviceaccount roles") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (builder, own, plain) = (node.pod()?, node.pod()?, node.pod()?);
    let cluster = KubeNode::start(node, Sts::Down, &["--serviceaccount-roles"])?;
    cluster.api.apply_service_account(service_account_object(
        "ci",
        "builder",
        &[(ROLE_KEY, "ci-builder")],
    ));
    let with_account = |pod: &Pod, name: &str, annotations: &[(&str, &str)]| {
        let mut object = pod_object(pod, "ci", name, annotations);
        object.spec.as_mut().unwrap().service_account_name = Some("builder".to_owned());
        object
    };
    cluster.api.apply_pod(with_account(&builder, "build-1", &[]));
    cluster
        .api
        .apply_pod(with_account(&own, "build-2", &[(ROLE_KEY, "own-role")]));
    cluster.api.apply_pod(pod_object(&plain, "ci", "plain", &[]));

    assert!(role_list_becomes(&builder, &builder.container()?, (200, "ci-builder")).await);
    assert_eq!(
        role_list(&own, &own.container()?).await?,
        (200, "own-role".to_owned())
    );
    // Until its ServiceAccount is listed, what a pod that names no role gets is not known: it is
    // asked to come back, and given nothing meanwhile, not the default role nor the node's.
    let plain_app = plain.container()?;
    let unknown = curl(&plain, &plain_app, &[ROLE_LIST]).await?;
    assert_eq!(status_of(&unknown), 503, "{unknown}");
    assert!(
        body_of(&unknown).contains("ServiceAccount is not known yet"),
        "{unknown}"
    );
    cluster
        .api
        .apply_service_account(service_account_object("ci", "default", &[]));
    assert!(
        role_list_becomes(&plain, &plain_app, (404, "")).await,
        "the default ServiceAccount names no role"
    );
    Ok(())
}

/// Namespace `team` allows `allowed`; pod `ok` asks for `app-web` and pod `bad` for `admin`.
async fn namespace_restrictions(format: &str, key: &str, allowed: &str) -> anyhow::Result<()> {
    let mut node = SimNode::new()?;
    let (ok, bad, other_bad) = (node.pod()?, node.pod()?, node.pod()?);
    let format_flag = format!("--namespace-restriction-format={format}");
    let key_flag = format!("--namespace-key={key}");
    let cluster = KubeNode::start(
        node,
        Sts::Down,
        &["--namespace-restrictions", &format_flag, &key_flag],
    )?;
    cluster
        .api
        .apply_namespace(namespace_object("team", &[(key, allowed)]));
    cluster
        .api
        .apply_pod(pod_object(&ok, "team", "ok", &[(ROLE_KEY, "app-web")]));
    cluster
        .api
        .apply_pod(pod_object(&bad, "team", "bad", &[(ROLE_KEY, "admin")]));
    cluster.api.apply_pod(pod_object(
        &other_bad,
        "team",
        "other-bad",
        &[(ROLE_KEY, "app-web-admin")],
    ));
    let (ok_app, bad_app, other_app) = (ok.container()?, bad.container()?, other_bad.container()?);

    assert!(role_list_becomes(&ok, &ok_app, (200, "app-web")).await);
    let refused = curl(&bad, &bad_app, &[ROLE_LIST]).await?;
    assert_eq!(status_of(&refused), 403, "{refused}");
    assert!(
        body_of(&refused).contains("not allowed in namespace \"team\""),
        "{refused}"
    );
    let events_for = |pod: &str| {
        cluster
            .api
            .events()
            .into_iter()
            .filter(|event| event["regarding"]["name"] == pod)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(|| async { events_for("bad").len() == 1 }).await,
        "one Event for the refused pod"
    );
    let event = &events_for("bad")[0];
    assert_eq!(event["reason"], "IAMRoleNotAllowed");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["uid"], bad.uid.as_str());

    // Again, within the rate limit: refused again, no second Event. Another pod's refusal, posted after
    // the repeat was decided, marks when a second Event would have been there.
    assert_eq!(status_of(&curl(&bad, &bad_app, &[ROLE_LIST]).await?), 403);
    assert_eq!(status_of(&curl(&other_bad, &other_app, &[ROLE_LIST]).await?), 403);
    assert!(eventually(|| async { events_for("other-bad").len() == 1 }).await);
    assert_eq!(events_for("bad").len(), 1, "a second Event within the rate limit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_globs_allow_their_roles_and_refuse_others_with_one_event() -> anyhow::Result<()> {
    if !can_run("namespace restrictions, glob") {
        return Ok(());
    }
    namespace_restrictions(
        "glob",
        "iam.amazonaws.com/allowed-roles",
        r#"["app-web", "reports-*"]"#,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_regexps_are_anchored_and_refuse_others_with_one_event() -> anyhow::Result<()> {
    if !can_run("namespace restrictions, regexp") {
        return Ok(());
    }
    // kiam's annotation: one bare pattern. Unanchored, `app-w.b` would allow `app-web-admin` too.
    namespace_restrictions("regexp", "iam.amazonaws.com/permitted", "app-w.b").await
}

/// An STS endpoint on the node that denies every request, as STS does when the role's trust policy does
/// not name the node's role. Returns its URL; it serves until the test process ends.
fn deny_every_assume_role(node: &SimNode) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    const DENIED: &str = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
        <Code>AccessDenied</Code><Message>User: arn:aws:sts::123456789012:assumed-role/nodes/i-0 is not authorized \
        to perform: sts:AssumeRole on resource: arn:aws:iam::123456789012:role/app-web</Message></Error>\
        <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>";
    let listener = node.bind_tcp((NODE_IP, 5002).into())?;
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let reply = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DENIED}",
                DENIED.len()
            );
            let _ = reader.get_mut().write_all(reply.as_bytes());
        }
    });
    Ok(format!("http://{NODE_IP}:5002"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_assume_role_is_an_event_on_the_pod_and_never_other_credentials() -> anyhow::Result<()> {
    if !can_run("AssumeRole failure event") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let web = node.pod()?;
    let sts = deny_every_assume_role(&node)?;
    // A generous STS timeout: a slow denial (under emulation) must still be a denial, not a timeout,
    // which is STS's trouble and no Event's business.
    let cluster = KubeNode::start(node, Sts::Down, &["--sts-endpoint", &sts, "--sts-timeout", "60s"])?;
    // Events go to the pod's namespace, which must exist, as on a real API server.
    cluster.api.apply_namespace(namespace_object("shop", &[]));
    cluster
        .api
        .apply_pod(pod_object(&web, "shop", "web", &[(ROLE_KEY, "app-web")]));
    let app = web.container()?;
    assert!(role_list_becomes(&web, &app, (200, "app-web")).await);

    let response = curl(&web, &app, &[&format!("{ROLE_LIST}app-web")]).await?;
    assert_eq!(status_of(&response), 503, "{response}");
    assert!(!response.contains("AccessKeyId"), "{response}");
    let posted = || {
        cluster
            .api
            .events()
            .into_iter()
            .filter(|event| event["regarding"]["name"] == "web")
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(|| async { !posted().is_empty() }).await,
        "an Event for the pod"
    );
    assert_eq!(posted()[0]["reason"], "IAMAssumeRoleFailed");
    assert!(
        posted()[0]["note"]
            .as_str()
            .is_some_and(|note| note.contains("AccessDenied") && note.contains("role/app-web")),
        "{:?}",
        posted()[0]
    );
    assert_eq!(cluster.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_asks_before_its_object_arrives_waits_for_it_and_one_that_never_does_gets_503()
-> anyhow::Result<()> {
    if !can_run("pod wait") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (late, never) = (node.pod()?, node.pod()?);
    let cluster = KubeNode::start(node, Sts::Down, &["--pod-wait", "800ms"])?;
    let (late_app, never_app) = (late.container()?, never.container()?);

    let asking = tokio::spawn({
        let command = late.command(&late_app, "curl")?;
        async move {
            let mut command = command;
            command.args(["-sS", "-i", "--noproxy", "*", "--max-time", "10", ROLE_LIST]);
            run(command).await
        }
    });
    // The race of kube2iam #46 and #102: the container runs, and asks, before the watch delivers its
    // pod. The object appears 300 ms after the request started waiting for it.
    cluster
        .agent
        .wait_for_log(&format!("\"pod_uid\":\"{}\"", late.uid))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster
        .api
        .apply_pod(pod_object(&late, "shop", "late", &[(ROLE_KEY, "app-late")]));
    let response = asking.await??;
    assert_eq!(
        (status_of(&response), body_of(&response).trim()),
        (200, "app-late"),
        "{response}"
    );
    let waited = request_latency(&cluster.agent, "app-late");
    assert!(
        waited >= Duration::from_millis(300),
        "the request did not wait: {waited:?}"
    );

    let started = std::time::Instant::now();
    let response = curl(&never, &never_app, &[ROLE_LIST]).await?;
    let took = started.elapsed();
    assert_eq!(status_of(&response), 503, "{response}");
    assert_eq!(header_of(&response, "retry-after"), Some("1"));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let refusal = r#""reason":"pod_not_known""#;
    let line = cluster
        .agent
        .wait_for_line(refusal, |line| line.contains(refusal))?;
    assert!(line.contains(&never.uid), "{line}");
    Ok(())
}

/// How long the agent took to answer the request that got `role`, from its request log.
fn request_latency(agent: &Agent, role: &str) -> Duration {
    let line = agent
        .wait_for_line("metadata request", |line| {
            line.contains("\"message\":\"metadata request\"") && line.contains(role)
        })
        .expect("the request is logged");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON log");
    Duration::from_micros(entry["latency_us"].as_u64().expect("latency_us"))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_api_server_down_known_pods_are_served_and_a_relist_after_410_drops_deleted_ones()
-> anyhow::Result<()> {
    if !can_run("API server outage") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (kept, deleted) = (node.pod()?, node.pod()?);
    let cluster = KubeNode::start(node, Sts::Down, &[])?;
    cluster
        .api
        .apply_pod(pod_object(&kept, "shop", "kept", &[(ROLE_KEY, "app-kept")]));
    cluster.api.apply_pod(pod_object(
        &deleted,
        "shop",
        "deleted",
        &[(ROLE_KEY, "app-deleted")],
    ));
    let (kept_app, deleted_app) = (kept.container()?, deleted.container()?);
    assert!(role_list_becomes(&kept, &kept_app, (200, "app-kept")).await);
    assert!(role_list_becomes(&deleted, &deleted_app, (200, "app-deleted")).await);

    cluster.api.set_down(true);
    assert_eq!(role_list(&kept, &kept_app).await?, (200, "app-kept".to_owned()));
    // Deleted while the agent cannot watch, and the history compacted: the agent's resourceVersion is
    // too old when it is back, the watch gets 410 Gone, and only a new list shows the deletion.
    assert!(cluster.api.delete_pod("shop", "deleted"));
    cluster.api.compact();
    let lists_before = pod_lists(&cluster);
    cluster.api.set_down(false);

    assert!(
        role_list_becomes(&deleted, &deleted_app, (404, "")).await,
        "the deleted pod is refused"
    );
    assert!(pod_lists(&cluster) > lists_before, "the agent re-listed its pods");
    assert_eq!(role_list(&kept, &kept_app).await?, (200, "app-kept".to_owned()));
    assert!(
        cluster
            .api
            .requests()
            .iter()
            .filter(|request| request.path == "/api/v1/pods")
            .all(|request| { request.param("fieldSelector") == Some(&format!("spec.nodeName={NODE_NAME}")) }),
        "the agent only ever asks for its own node's pods"
    );
    Ok(())
}

fn pod_lists(cluster: &KubeNode) -> usize {
    cluster
        .api
        .requests()
        .iter()
        .filter(|request| request.path == "/api/v1/pods" && request.is_list())
        .count()
}

/// The taint nodes register with until the agent is ready (`--remove-node-taint`).
const READINESS_TAINT: &str = "interceptor.dev/agent-not-ready";
/// A taint of the node's own, which the agent must leave alone.
const DEDICATED_TAINT: (&str, Option<&str>, &str) = ("dedicated", Some("gpu"), "NoSchedule");

/// The keys of the node's taints, in order.
fn taint_keys(cluster: &KubeNode) -> Vec<String> {
    let node = cluster.api.node(NODE_NAME).expect("the node is registered");
    let taints = node.spec.and_then(|spec| spec.taints).unwrap_or_default();
    taints.into_iter().map(|taint| taint.key).collect()
}

async fn taint_keys_become(cluster: &KubeNode, expected: &[&str]) -> bool {
    eventually(|| async { taint_keys(cluster) == expected }).await
}

/// The requests for the node's own Node object.
fn node_requests(cluster: &KubeNode) -> Vec<(String, u16)> {
    let path = format!("/api/v1/nodes/{NODE_NAME}");
    let requests = cluster.api.requests().into_iter();
    requests
        .filter(|request| request.path == path)
        .map(|request| (request.method, request.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn once_ready_the_agent_removes_its_readiness_taint_and_leaves_the_nodes_others() -> anyhow::Result<()>
{
    if !can_run("readiness taint") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let registered = node_object(&[(READINESS_TAINT, Some("true"), "NoSchedule"), DEDICATED_TAINT]);
    let cluster = KubeNode::start_with(
        node,
        Sts::Down,
        &["--remove-node-taint", READINESS_TAINT],
        |api| {
            api.apply_node(registered);
        },
    )?;

    assert!(
        taint_keys_become(&cluster, &[DEDICATED_TAINT.0]).await,
        "only the node's own taint is left: {:?}",
        taint_keys(&cluster)
    );
    cluster.agent.wait_for_log("node taint removed")?;
    let dedicated = &cluster
        .api
        .node(NODE_NAME)
        .expect("registered")
        .spec
        .expect("spec")
        .taints
        .expect("taints")[0];
    assert_eq!(
        (dedicated.value.as_deref(), dedicated.effect.as_str()),
        (DEDICATED_TAINT.1, DEDICATED_TAINT.2),
        "the taint left is unchanged"
    );
    assert_eq!(
        node_requests(&cluster),
        [("GET".to_owned(), 200), ("PATCH".to_owned(), 200)],
        "one read, one patch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taint_someone_adds_between_the_agents_read_and_its_patch_is_kept() -> anyhow::Result<()> {
    if !can_run("readiness taint race") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let readiness = (READINESS_TAINT, Some("true"), "NoSchedule");
    let maintenance = ("example.com/maintenance", None, "NoExecute");
    let cluster = KubeNode::start_with(
        node,
        Sts::Down,
        &["--remove-node-taint", READINESS_TAINT],
        |api| {
            api.apply_node(node_object(&[readiness, DEDICATED_TAINT]));
            // Someone else taints the node after the agent has read it: the agent's patch, made from what
            // it read, must not take that taint away.
            api.change_node_before_next_patch(node_object(&[readiness, DEDICATED_TAINT, maintenance]));
        },
    )?;

    assert!(
        taint_keys_become(&cluster, &[DEDICATED_TAINT.0, maintenance.0]).await,
        "the readiness taint is gone and the new one kept: {:?}",
        taint_keys(&cluster)
    );
    cluster.agent.wait_for_log("node taint removed")?;
    assert_eq!(
        node_requests(&cluster),
        [
            ("GET".to_owned(), 200),
            ("PATCH".to_owned(), 422),
            ("GET".to_owned(), 200),
            ("PATCH".to_owned(), 200)
        ],
        "the failed test made the agent read the node again"
    );
    assert!(
        cluster
            .agent
            .logs()
            .iter()
            .any(|line| line.contains("cannot remove the node taint") && line.contains("422")),
        "the failed attempt is a warning with its error"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_is_not_ready_leaves_the_readiness_taint() -> anyhow::Result<()> {
    if !can_run("readiness taint before ready") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let mut cluster = KubeNode::start_with(node, Sts::Down, &[], |api| {
        api.apply_node(node_object(&[(READINESS_TAINT, Some("true"), "NoSchedule")]));
    })?;
    // The agent again, with the taint to remove, while its pods cannot be listed: it attaches and
    // listens, and is never ready.
    cluster.agent.kill()?;
    cluster.api.set_failing("/api/v1/pods", true);
    let failed_lists = || {
        let requests = cluster.api.requests().into_iter();
        requests
            .filter(|request| request.path == "/api/v1/pods" && request.status == 503)
            .count()
    };
    let mut command = cluster.agent_command()?;
    command.args(["--remove-node-taint", READINESS_TAINT]);
    cluster.agent = Agent::start_until(command, "Kubernetes API")?;
    assert!(
        eventually(|| async { failed_lists() >= 2 }).await,
        "the agent keeps trying to list its pods"
    );
    assert!(
        !cluster
            .agent
            .logs()
            .iter()
            .any(|line| line.contains("\"message\":\"ready\"")),
        "the agent is not ready"
    );
    assert_eq!(taint_keys(&cluster), [READINESS_TAINT]);
    assert_eq!(node_requests(&cluster), [], "the agent never touched its Node");

    // Ready once its pods are listed, and only then the taint goes.
    cluster.api.set_failing("/api/v1/pods", false);
    assert!(
        taint_keys_become(&cluster, &[]).await,
        "{:?}",
        taint_keys(&cluster)
    );
    cluster.agent.wait_for_log("node taint removed")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_first_requests_from_many_pods_of_one_role_makes_one_call_per_session()
-> anyhow::Result<()> {
    if !can_run_with_python("burst of pods for one role") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    // Ten pods of a CronJob that name one session (the annotation in its pod template), and five
    // pods of the same role with their own sessions (the default `<namespace>.<pod>`).
    let sharing: Vec<Pod> = (0..10).map(|_| node.pod()).collect::<anyhow::Result<_>>()?;
    let own: Vec<Pod> = (0..5).map(|_| node.pod()).collect::<anyhow::Result<_>>()?;
    let cluster = KubeNode::start(node, Sts::Moto, &[])?;
    let session_key = "iam.amazonaws.com/session-name";
    for (index, pod) in sharing.iter().enumerate() {
        cluster.api.apply_pod(pod_object(
            pod,
            "jobs",
            &format!("nightly-{index}"),
            &[(ROLE_KEY, "batch-runner"), (session_key, "nightly")],
        ));
    }
    for (index, pod) in own.iter().enumerate() {
        cluster.api.apply_pod(pod_object(
            pod,
            "jobs",
            &format!("worker-{index}"),
            &[(ROLE_KEY, "batch-runner")],
        ));
    }
    let mut callers = Vec::new();
    for pod in sharing.iter().chain(&own) {
        let container = pod.container()?;
        assert!(
            role_list_becomes(pod, &container, (200, "batch-runner")).await,
            "a pod was never known"
        );
        callers.push(format!("{}=batch-runner", container.display()));
    }
    assert_eq!(
        cluster.moto().assume_role_calls()?,
        0,
        "the role list needs no STS"
    );

    // Ten first requests from each of the fifteen pods, all released at once.
    let first = &sharing[0];
    let mut command = first.command(&first.container()?, env!("CARGO_BIN_EXE_sim-client"))?;
    command
        .args(["fan-in", "169.254.169.254:80"])
        .args(["--path-prefix", "/latest/meta-data/iam/security-credentials/"])
        .args(["--per-caller", "10"])
        .args(&callers);
    let output = run(command).await?;
    let counts = (output_field(&output, "ok")?, output_field(&output, "failed")?);
    assert_eq!(counts, (150.0, 0.0), "{output}");
    assert_eq!(
        cluster.moto().assume_role_calls()?,
        1 + own.len(),
        "one call for the shared session, one for each pod's own"
    );
    Ok(())
}
