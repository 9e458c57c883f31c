//! The chart's DaemonSet run on the simulated node as the kubelet runs it: `helm template`'s agent
//! container (args and env exactly as rendered, downward-API values and `$(VAR)` references filled in
//! by `kubelet`), the real agent binary in a container cgroup of the DaemonSet's pod under kubepods,
//! with the container's mounts (the node's cgroup tree and bpffs), a cgroup namespace of its own, and
//! in-cluster config (ServiceAccount files, `KUBERNETES_SERVICE_HOST`) for the fake API server over
//! HTTPS (`daemonset_node`), which enforces the rendered ClusterRole. Pods get their roles through the
//! AWS CLI with moto as STS; the uninstall DaemonSet's command removes what the agent left. kube2iam's
//! own chart's DaemonSet, only its image changed, runs the agent the same way under kube2iam's
//! ClusterRole. Restarts under load are in the chaos test.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use interceptor_tests::{
    agent::{ACCOUNT_ID, Agent},
    chart,
    daemonset_node::{DEFAULT_VALUES, DaemonSetNode, DaemonSetSpec, can_run, image_env},
    deployed::{aws_cli_caller_arn, body_of, curl, role_list, role_list_becomes},
    kernel,
    kube_api::FakeApiServer,
    kube_node::pod_object,
    kube2iam_chart,
    lab::{StandIn, curl_args, run},
    sim::{self, NODE_IP, SimNode},
};
use serde_json::Value;

const ROLE_KEY: &str = "iam.amazonaws.com/role";
/// The account of the stand-in's instance profile, which `--auto-discover-base-arn` finds.
const NODE_ACCOUNT_ID: &str = "210987654321";

/// The blog post's pod: `aws-cli` in `default`, annotated with a role name (the suffix of the ARN),
/// and a pod beside it without the annotation. Returns what the AWS CLI in the annotated pod is, and
/// what the role list says to the other.
async fn blog_post_pods(cluster: &mut DaemonSetNode) -> Result<(String, (u16, String), sim::Pod, PathBuf)> {
    let (annotated, plain) = (cluster.node.pod()?, cluster.node.pod()?);
    cluster.api.apply_pod(pod_object(
        &annotated,
        "default",
        "aws-cli",
        &[(ROLE_KEY, "prefix-reader")],
    ));
    cluster.api.apply_pod(pod_object(&plain, "default", "plain", &[]));
    let (annotated_app, plain_app) = (annotated.container()?, plain.container()?);
    ensure!(
        role_list_becomes(&annotated, &annotated_app, (200, "")).await,
        "the annotated pod never got its role list"
    );
    let arn = aws_cli_caller_arn(&annotated, &annotated_app, &cluster.moto.url()).await?;
    let plain_list = role_list(&plain, &plain_app).await?;
    Ok((arn, plain_list, plain, plain_app))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_default_values_the_daemonset_serves_the_annotated_pod_its_role_and_others_nothing()
-> Result<()> {
    if !can_run("DaemonSet, default values") {
        return Ok(());
    }
    let mut cluster = DaemonSetNode::start(SimNode::new()?, DEFAULT_VALUES)?;
    cluster.assert_agent_runs_as_in_its_pod()?;
    let (arn, plain_list, _, _) = blog_post_pods(&mut cluster).await?;
    assert_eq!(
        arn,
        format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/prefix-reader/default.aws-cli")
    );
    assert_eq!(plain_list.0, 404, "no role and no default role: {plain_list:?}");
    assert_eq!(
        cluster.stand_in.tcp_accepted(),
        0,
        "{:?}",
        cluster.stand_in.metadata_paths()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_kube2iam_values_the_daemonset_serves_the_annotated_pod_its_role_and_others_the_nodes()
-> Result<()> {
    if !can_run("DaemonSet, kube2iam values") {
        return Ok(());
    }
    let kube2iam = chart::values_file("kube2iam-values.yaml");
    let mut cluster = DaemonSetNode::start(SimNode::new()?, &["--values", &kube2iam])?;
    cluster.assert_agent_runs_as_in_its_pod()?;
    // The agent's own discovery (base ARN, default role) asked the node's metadata service; no pod may.
    let discovery = cluster.stand_in.metadata_paths();
    assert_discovered_roles_served(&mut cluster).await?;
    assert_eq!(cluster.stand_in.metadata_paths(), discovery);
    Ok(())
}

/// With the base ARN and the default role discovered from the node (account [`NODE_ACCOUNT_ID`]): the
/// blog post's annotated pod gets its role in the node's account, and the pod beside it the node's own
/// role, each as the AWS CLI in it proves. Returns the plain pod and its container.
async fn assert_discovered_roles_served(cluster: &mut DaemonSetNode) -> Result<(sim::Pod, PathBuf)> {
    let (arn, plain_list, plain, plain_app) = blog_post_pods(cluster).await?;
    assert_eq!(
        arn,
        format!("arn:aws:sts::{NODE_ACCOUNT_ID}:assumed-role/prefix-reader/default.aws-cli")
    );
    assert_eq!(plain_list, (200, StandIn::NODE_ROLE.to_owned()));
    let plain_arn = aws_cli_caller_arn(&plain, &plain_app, &cluster.moto.url()).await?;
    assert_eq!(
        plain_arn,
        format!(
            "arn:aws:sts::{NODE_ACCOUNT_ID}:assumed-role/{}/default.plain",
            StandIn::NODE_ROLE
        )
    );
    Ok((plain, plain_app))
}

/// kube2iam's chart's DaemonSet with `pod_spec` (`kube2iam_chart`), its image replaced by ours, under
/// kube2iam's ClusterRole. Its pod spec mounts neither the node's cgroup tree nor its bpffs, which the
/// simulated node keeps elsewhere: the simulation says where, and asks for JSON logs to read.
fn kube2iam_daemonset(node: &SimNode, pod_spec: Value) -> DaemonSetSpec {
    let env = |name: &str, value: &dyn AsRef<std::ffi::OsStr>| {
        let value = value.as_ref().to_string_lossy().into_owned();
        (name.to_owned(), value)
    };
    DaemonSetSpec {
        pod_spec,
        container: kube2iam_chart::CONTAINER.to_owned(),
        rules: Some(kube2iam_chart::cluster_role_rules()),
        simulation_env: vec![
            env("INTERCEPTOR_CGROUP_ROOT", &node.kubepods()),
            env("INTERCEPTOR_BPFFS_DIR", &node.bpffs_dir()),
            env("INTERCEPTOR_LOG_FORMAT", &"json"),
        ],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kube2iam_chart_daemonsets_container_starts_the_agent_unchanged_and_serves_roles() -> Result<()> {
    if !can_run("kube2iam chart DaemonSet") {
        return Ok(());
    }
    for (values, pod_spec) in [
        ("the blog post's", kube2iam_chart::blog_post_pod_spec()),
        ("Calico's, default role alone", kube2iam_chart::calico_pod_spec()),
    ] {
        println!("kube2iam's chart with {values} values");
        let node = SimNode::new()?;
        let daemonset = kube2iam_daemonset(&node, pod_spec);
        let mut cluster = DaemonSetNode::start_with(node, daemonset, |_| {})?;
        cluster.assert_agent_runs_as_in_its_pod()?;
        let logs = cluster.agent.logs();
        let warned: Vec<&String> = logs
            .iter()
            .filter(|line| line.contains("kube2iam flag ignored"))
            .collect();
        assert_eq!(warned.len(), 2, "{values}: {warned:#?}");
        for flag in ["--iptables", "--host-interface"] {
            let said = format!("\"flag\":\"{flag}\"");
            assert!(warned.iter().any(|line| line.contains(&said)), "{values}: {flag}");
        }
        // The base ARN and the default role came from the node's instance profile.
        let discovery = cluster.stand_in.metadata_paths();
        for path in [
            "/latest/meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials/",
        ] {
            assert!(
                discovery.iter().any(|asked| asked == path),
                "{values}: {discovery:?}"
            );
        }

        let (plain, plain_app) = assert_discovered_roles_served(&mut cluster).await?;
        // kube2iam's probes ask /healthz on the app port; pods there see the metadata service.
        let kubelet = cluster.node.cgroup("system.slice/kubelet.service")?;
        let mut probe = cluster.node.command(&kubelet, "curl")?;
        probe.args(curl_args(&format!("http://{NODE_IP}:8181/healthz")));
        assert_eq!(run(probe).await?, "ok", "{values}");
        let from_pod = curl(&plain, &plain_app, &["http://169.254.169.254/healthz"]).await?;
        assert_ne!(body_of(&from_pod).trim(), "ok", "{values}");
        // kube2iam's ClusterRole is enough to serve; only the Event on a refused pod is refused.
        let refused = |api: &FakeApiServer| -> Vec<String> {
            let requests = api.requests().into_iter();
            let refused = requests.filter(|request| request.status == 403);
            refused
                .map(|request| format!("{} {}", request.method, request.path))
                .collect()
        };
        assert_eq!(refused(&cluster.api), Vec::<String>::new(), "{values}");
        let bad = cluster.node.pod()?;
        let bad_object = pod_object(&bad, "default", "bad", &[(ROLE_KEY, "../admin")]);
        cluster.api.apply_pod(bad_object);
        assert!(
            role_list_becomes(&bad, &bad.container()?, (403, "")).await,
            "{values}"
        );
        cluster.agent.wait_for_line("the refused Event", |line| {
            line.contains("cannot post event") && line.contains("is forbidden")
        })?;
        assert_eq!(
            refused(&cluster.api),
            ["POST /apis/events.k8s.io/v1/namespaces/default/events"],
            "{values}"
        );
        // No pod reached the node's metadata service.
        assert_eq!(cluster.stand_in.metadata_paths(), discovery, "{values}");
    }
    Ok(())
}

/// The programs attached at `root`, one count per attach type the agent uses.
fn programs_on(root: &Path) -> Result<Vec<usize>> {
    kernel::AGENT_ATTACH_TYPES
        .iter()
        .map(|&attach_type| Ok(kernel::attached_programs(root, attach_type)?.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_uninstall_daemonsets_command_detaches_and_unpins_what_a_killed_agent_left() -> Result<()> {
    if !can_run("uninstall DaemonSet") {
        return Ok(());
    }
    let mut cluster = DaemonSetNode::start(SimNode::new()?, DEFAULT_VALUES)?;
    let root = cluster.node.kubepods().to_path_buf();
    assert_eq!(programs_on(&root)?, [1; kernel::AGENT_PROGRAMS]);
    cluster.agent.kill()?;
    assert_eq!(
        programs_on(&root)?,
        [1; kernel::AGENT_PROGRAMS],
        "the programs outlive the agent"
    );

    let objects = chart::render(&[DEFAULT_VALUES, &["--set", "uninstall.enabled=true"]].concat())?;
    let pod_spec = &chart::daemonset(&objects, "interceptor-uninstall")["spec"]["template"]["spec"];
    let uninstall = cluster.kubelet.container(pod_spec, "uninstall")?;
    let pod = cluster.node.pod()?;
    let command = uninstall.command(&cluster.node, &pod.container()?, &Agent::binary()?, &image_env())?;
    let said = run(command).await?;
    let detached = format!("detached {} programs", kernel::AGENT_PROGRAMS);
    assert!(said.contains(&detached), "{said}");

    assert_eq!(
        programs_on(&root)?,
        [0; kernel::AGENT_PROGRAMS],
        "programs still attached"
    );
    let bpffs_dir = cluster.node.bpffs_dir();
    let left: Vec<_> = match std::fs::read_dir(&bpffs_dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err.into()),
    };
    assert!(left.is_empty(), "still pinned: {left:?}");
    Ok(())
}
