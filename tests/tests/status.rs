//! `interceptor status` on a simulated node with the real agent: the programs it lists are the ones the
//! kernel reports at the node's cgroup root, the pins and map occupancy are the bpffs's, the agent's
//! part names the pods and roles of the requests just made, and nothing in it is a secret. With the
//! agent gone the kernel's part is still there; the status socket is a Unix socket only root can use,
//! made and removed by the agent, and the agent opens no TCP listener for it.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, ensure};
use aya_obj::generated::bpf_attach_type;
use interceptor::identity;
use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN},
    deployed::{
        DeployedNode, ROLE_LIST, Sts, body_of, credentials_served_to, curl, eventually, put_token, status_of,
    },
    kernel,
    kube_node::{KubeNode, NODE_NAME, namespace_object, pod_object, service_account_object},
    lab::{Interactive, run},
    privileged,
    sim::{NODE_IP, Pod, SimNode},
};
use serde_json::Value;

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");

/// The attach points the agent uses, as the report names them, and the programs' names as loaded
/// (the kernel keeps 15 characters).
const ATTACHED: [(bpf_attach_type, &str, &str); 8] = [
    (bpf_attach_type::BPF_CGROUP_INET4_CONNECT, "connect4", "connect4"),
    (bpf_attach_type::BPF_CGROUP_INET6_CONNECT, "connect6", "connect6"),
    (bpf_attach_type::BPF_CGROUP_INET4_BIND, "bind4", "bind4"),
    (bpf_attach_type::BPF_CGROUP_INET6_BIND, "bind6", "bind6"),
    (
        bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        "getpeername4",
        "getpeername4",
    ),
    (
        bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        "getpeername6",
        "getpeername6",
    ),
    (
        bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        "sock_ops",
        "file_connection",
    ),
    (
        bpf_attach_type::BPF_CGROUP_INET_EGRESS,
        "egress",
        "drop_escaped_me",
    ),
];

/// A directory for the status socket that anyone may traverse, so only the agent's own modes (its
/// directory's and the socket's) stand between a non-root process and the socket.
fn socket_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("interceptor-status").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// `interceptor status` with `args`, run on the node as root: its standard output (it must succeed).
async fn status(node: &SimNode, args: &[&OsStr]) -> Result<String> {
    let mut command = Agent::status_command(node)?;
    command.args(args);
    run(command).await
}

async fn status_json(node: &SimNode, args: &[&OsStr]) -> Result<Value> {
    let mut args = args.to_vec();
    args.extend([OsStr::new("--output"), OsStr::new("json")]);
    let text = status(node, &args).await?;
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// The credentials a container gets for its role, and an IMDSv2 token: the values no report may hold.
async fn secrets_of(pod: &Pod, container: &Path, role: &str) -> Result<Vec<String>> {
    let (listed, doc) = credentials_served_to(pod, container).await?;
    ensure!(listed == role, "the pod is given {listed}, not {role}");
    let mut secrets: Vec<String> = ["AccessKeyId", "SecretAccessKey", "Token"]
        .iter()
        .map(|field| doc[field].as_str().unwrap_or_default().to_owned())
        .collect();
    secrets.push(body_of(&put_token(pod, container).await?).to_owned());
    ensure!(secrets.iter().all(|secret| secret.len() >= 16), "{secrets:?}");
    Ok(secrets)
}

/// Whether the role list answers `pod` with `expected` (waiting, bounded, for the agent to learn the
/// pod from the API server).
async fn role_list_is(pod: &Pod, container: &Path, expected: u16) -> bool {
    eventually(|| async {
        curl(pod, container, &[ROLE_LIST])
            .await
            .is_ok_and(|response| status_of(&response) == expected)
    })
    .await
}

/// The program ids the kernel reports at `root`, by the report's attach type names.
fn kernel_programs(root: &Path) -> Result<BTreeMap<String, Vec<u64>>> {
    ATTACHED
        .iter()
        .map(|&(attach_type, name, _)| {
            let ids = kernel::attached_programs(root, attach_type)?;
            Ok((name.to_owned(), ids.into_iter().map(u64::from).collect()))
        })
        .collect()
}

/// The report's attached programs, by attach type.
fn reported_programs(report: &Value) -> BTreeMap<String, Vec<u64>> {
    let mut by_type: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for program in report["kernel"]["attached"].as_array().into_iter().flatten() {
        by_type
            .entry(program["attach_type"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(program["program_id"].as_u64().unwrap_or_default());
    }
    by_type
}

/// The report's pinned map whose pin is named `name`.
fn pinned_map<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["kernel"]["pins"]["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|map| {
            map["path"]
                .as_str()
                .is_some_and(|path| path.ends_with(&format!("/maps/{name}")))
        })
        .unwrap_or_else(|| panic!("no pinned map {name}: {report:#}"))
}

fn assert_kernel_part(report: &Value, node: &SimNode) -> Result<()> {
    let kernel_says = kernel_programs(node.kubepods())?;
    assert_eq!(reported_programs(report), kernel_says, "{report:#}");
    for (_, attach_type, name) in ATTACHED {
        let program = report["kernel"]["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|program| program["attach_type"] == attach_type)
            .expect("every attach type is reported");
        assert_eq!(program["name"], name, "{program}");
    }
    assert_eq!(report["kernel"]["bpffs_dir"], node.bpffs_dir().to_str().unwrap());
    let links = report["kernel"]["pins"]["links"].as_array().expect("links");
    let pinned_programs: BTreeSet<u64> = links
        .iter()
        .map(|link| link["program_id"].as_u64().unwrap())
        .collect();
    let attached: BTreeSet<u64> = kernel_says.values().flatten().copied().collect();
    assert_eq!(
        pinned_programs, attached,
        "every attached program is held by a pin"
    );
    assert_eq!(
        report["kernel"]["pins"]["maps"].as_array().map(Vec::len),
        Some(kernel::AGENT_PINNED_MAPS)
    );
    assert_eq!(pinned_map(report, "INTERCEPTED")["entries"], 2);
    assert_eq!(pinned_map(report, "EXEMPT_CGROUPS")["entries"], 1);
    // The agent's port and its health port.
    assert_eq!(pinned_map(report, "GUARDED_PORTS")["entries"], 2);
    assert_eq!(report["kernel"]["errors"], serde_json::json!([]));
    Ok(())
}

fn assert_no_secret(output: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !output.contains(secret.as_str()),
            "the status shows a secret: {output}"
        );
    }
}

/// The TCP addresses `pid` listens on: its socket fds matched to its network namespace's table.
fn tcp_listeners(pid: u32) -> Result<BTreeSet<SocketAddr>> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        if let Some(inode) = target
            .to_str()
            .and_then(|target| target.strip_prefix("socket:["))
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut listeners = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                listeners.insert(proc_net_addr(fields[1])?);
            }
        }
    }
    Ok(listeners)
}

/// `0100630A:1FF5` as a socket address: the address is printed as the 32-bit words in memory, each
/// read in the machine's byte order; the port is plain hex.
fn proc_net_addr(text: &str) -> Result<SocketAddr> {
    let (addr, port) = text.split_once(':').context("no port")?;
    let bytes: Vec<u8> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes.as_slice()).context("bad address")?,
        )),
    };
    Ok(SocketAddr::new(ip, u16::from_str_radix(port, 16)?))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_kernel_and_the_agent_and_never_a_secret() -> Result<()> {
    if !privileged::can_run("status") || !privileged::has_python_tools("status") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (alpha, beta, stranger) = (node.pod()?, node.pod()?, node.pod()?);
    let (a, b, s) = (alpha.container()?, beta.container()?, stranger.container()?);
    let dir = socket_dir()?;
    let socket = dir.path().join("run/status.sock");
    let mut t = DeployedNode::start(
        node,
        &[(alpha.slice(), "alpha"), (beta.slice(), "beta")],
        Sts::Moto,
        &["--status-socket", socket.to_str().unwrap()],
    )?;

    let mut secrets = secrets_of(&alpha, &a, "alpha").await?;
    secrets.extend(secrets_of(&beta, &b, "beta").await?);
    assert_eq!(status_of(&curl(&stranger, &s, &[ROLE_LIST]).await?), 404);
    // Connections that stay open keep their connect records in the cookie map.
    let mut held = Interactive::spawn({
        let mut command = alpha.command(&a, SIM_CLIENT)?;
        command.args(["hold", "169.254.169.254:80", "--count", "3"]);
        command
    })?;
    assert_eq!(held.line().await?, "opened=3 failed=0");

    let socket_arg = ["--status-socket".as_ref(), socket.as_os_str()];
    let report = status_json(&t.node, &socket_arg).await?;
    assert_kernel_part(&report, &t.node)?;
    assert_eq!(
        report["kernel"]["cgroup_root"],
        t.node.kubepods().to_str().unwrap()
    );
    assert_eq!(report["kernel"]["cgroup_root_from"], "agent");
    let by_cookie = pinned_map(&report, "CONNECTS_BY_COOKIE");
    assert!(by_cookie["entries"].as_u64() >= Some(3), "{by_cookie}");
    assert_eq!(by_cookie["max_entries"], 65_536);

    let agent = &report["agent"];
    assert_eq!(agent["reachable"], true, "{agent:#}");
    assert_eq!(agent["pid"], t.agent.pid());
    assert_eq!(agent["ready"], true);
    assert_eq!(agent["sources"][0]["kind"], "static");
    assert_eq!(agent["sources"][0]["workloads"], 2);
    let workloads = agent["workloads"].as_array().expect("workloads");
    for (pod, role) in [(&alpha, "alpha"), (&beta, "beta")] {
        let mount = identity::cgroup2_mount()?;
        let cgroup = pod.slice().strip_prefix(&mount)?.to_str().unwrap();
        let workload = workloads
            .iter()
            .find(|workload| workload["name"] == format!("static/{role}"))
            .unwrap_or_else(|| panic!("static/{role} is not listed: {agent:#}"));
        assert_eq!(workload["cgroup"], cgroup);
        assert_eq!(workload["role_arn"], format!("{BASE_ROLE_ARN}{role}"));
    }

    // The requests, newest first: the stranger's refusal, then beta's and alpha's.
    let attributions = agent["attributions"].as_array().expect("attributions");
    let stranger_id = identity::cgroup_id(&s)?.0;
    assert_eq!(attributions[0]["cgroup_id"], stranger_id, "{agent:#}");
    assert_eq!(attributions[0]["reason"], "unknown_workload");
    assert_eq!(attributions[0]["status"], 404);
    for (container, role) in [(&a, "alpha"), (&b, "beta")] {
        let served = attributions
            .iter()
            .find(|request| {
                request["route"] == "credentials" && request["workload"] == format!("static/{role}")
            })
            .unwrap_or_else(|| panic!("no credentials request of {role}: {agent:#}"));
        assert_eq!(served["status"], 200);
        assert_eq!(served["cgroup_id"], identity::cgroup_id(container)?.0);
        assert_eq!(served["role_arn"], format!("{BASE_ROLE_ARN}{role}"));
        assert!(served["reason"].is_null());
    }
    let beta_at = attributions.iter().position(|r| r["workload"] == "static/beta");
    let alpha_at = attributions.iter().position(|r| r["workload"] == "static/alpha");
    assert!(beta_at < alpha_at, "newest first: {agent:#}");
    assert_no_secret(&report.to_string(), &secrets);

    let table = status(&t.node, &socket_arg).await?;
    for expected in [
        "KERNEL",
        "connect4",
        "CONNECTS_BY_COOKIE",
        "AGENT",
        "static/alpha",
        "refused: unknown_workload",
    ] {
        assert!(table.contains(expected), "{expected} missing:\n{table}");
    }
    assert_no_secret(&table, &secrets);

    // Hostile: the socket is no network service. The agent listens on TCP at its two configured
    // addresses only, and a pod's process that is not root cannot use the socket, which root can.
    let listeners = tcp_listeners(t.agent.pid())?;
    let expected: BTreeSet<SocketAddr> = [
        SocketAddr::from((NODE_IP, 8181)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9181)),
    ]
    .into();
    assert_eq!(listeners, expected);
    let ask = |as_nobody: bool| -> Result<std::process::Command> {
        let mut command = match as_nobody {
            true => {
                let mut command = alpha.command(&a, "setpriv")?;
                command.args([
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    "--",
                    "curl",
                ]);
                command
            }
            false => alpha.command(&a, "curl")?,
        };
        command
            .args(["-sS", "--max-time", "5", "--unix-socket"])
            .arg(&socket)
            .arg("http://interceptor/status");
        Ok(command)
    };
    let refused = run(ask(true)?).await;
    assert!(
        refused.is_err(),
        "a non-root process read the status: {refused:?}"
    );
    assert!(run(ask(false)?).await?.contains("\"attributions\""));

    // The agent dies; its pins stay, and so does the kernel's part of the status.
    held.finish().await?;
    t.agent.kill()?;
    let bpffs_dir = t.node.bpffs_dir();
    let args = [
        "--cgroup-root".as_ref(),
        t.node.kubepods().as_os_str(),
        "--bpffs-dir".as_ref(),
        bpffs_dir.as_os_str(),
        "--status-socket".as_ref(),
        socket.as_os_str(),
    ];
    let after = status_json(&t.node, &args).await?;
    assert_kernel_part(&after, &t.node)?;
    assert_eq!(after["kernel"]["cgroup_root_from"], "flag");
    assert_eq!(reported_programs(&after), reported_programs(&report));
    assert_eq!(after["agent"]["reachable"], false);
    let error = after["agent"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("Connection refused"), "{error}");
    let table = status(&t.node, &args).await?;
    assert!(table.contains("not reachable: "), "{table}");
    assert!(table.contains("connect4"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_makes_its_socket_for_root_only_and_removes_it_when_it_stops() -> Result<()> {
    if !privileged::can_run("status socket") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let dir = socket_dir()?;
    let socket_dir = dir.path().join("run");
    let socket = socket_dir.join("status.sock");
    // A socket a killed agent left behind: the next agent replaces it.
    std::fs::create_dir(&socket_dir)?;
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    let stale = std::fs::metadata(&socket)?;

    let t = DeployedNode::start(
        node,
        &[(pod.slice(), "alpha")],
        Sts::Down,
        &["--status-socket", socket.to_str().unwrap()],
    )?;
    let meta = std::fs::symlink_metadata(&socket)?;
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_ne!(meta.ino(), stale.ino(), "the stale socket was replaced");
    let report = status_json(&t.node, &["--status-socket".as_ref(), socket.as_os_str()]).await?;
    assert_eq!(report["agent"]["reachable"], true, "{report:#}");

    // A directory the agent makes is for root only.
    let made = dir.path().join("made/here");
    let other = DeployedNode::start(
        SimNode::new()?,
        &[],
        Sts::Down,
        &["--status-socket", made.join("status.sock").to_str().unwrap()],
    )?;
    assert_eq!(std::fs::metadata(&made)?.permissions().mode() & 0o777, 0o700);
    drop(other);

    // SIGTERM: the agent stops as a DaemonSet's pod does, and takes its socket with it.
    // SAFETY: kill(2) on the agent's pid, which this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(t.agent.pid() as i32, libc::SIGTERM) }, 0);
    t.agent.wait_for_log("shutting down")?;
    assert!(
        eventually(|| async { !socket.exists() }).await,
        "the socket outlived the agent"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_kubernetes_node_status_names_the_pods_and_the_role_each_gets() -> Result<()> {
    if !privileged::can_run("status with pods") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (web, batch) = (node.pod()?, node.pod()?);
    let (web_app, batch_app) = (web.container()?, batch.container()?);
    let dir = socket_dir()?;
    let socket = dir.path().join("run/status.sock");
    let cluster = KubeNode::start(node, Sts::Down, &["--status-socket", socket.to_str().unwrap()])?;
    cluster.api.apply_pod(pod_object(
        &web,
        "shop",
        "web-7d9f",
        &[("iam.amazonaws.com/role", "app-web")],
    ));
    cluster.api.apply_pod(pod_object(&batch, "shop", "batch-x2", &[]));
    assert!(role_list_is(&web, &web_app, 200).await);
    assert!(role_list_is(&batch, &batch_app, 404).await);

    let report = status_json(&cluster.node, &["--status-socket".as_ref(), socket.as_os_str()]).await?;
    let agent = &report["agent"];
    assert_eq!(agent["sources"][0]["kind"], "kubernetes", "{agent:#}");
    assert_eq!(agent["sources"][0]["from"], NODE_NAME);
    assert_eq!(agent["sources"][0]["synced"], true);
    assert_eq!(agent["sources"][0]["workloads"], 2);
    let workload = |name: &str| -> &Value {
        agent["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|workload| workload["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed: {agent:#}"))
    };
    let listed = workload("shop/web-7d9f");
    assert_eq!(listed["source"], "kubernetes");
    assert_eq!(listed["pod"]["uid"], web.uid.as_str());
    assert_eq!(listed["role_arn"], format!("{BASE_ROLE_ARN}app-web"));
    let unannotated = workload("shop/batch-x2");
    assert!(unannotated["role_arn"].is_null());
    assert!(unannotated["no_role"].is_string(), "{unannotated}");

    let attributions = agent["attributions"].as_array().expect("attributions");
    let web_id = identity::cgroup_id(&web_app)?.0;
    let served = attributions
        .iter()
        .find(|request| request["cgroup_id"] == web_id && request["status"] == 200)
        .unwrap_or_else(|| panic!("no answered request of the web pod: {agent:#}"));
    assert_eq!(served["workload"], "shop/web-7d9f");
    assert_eq!(served["pod"]["namespace"], "shop");
    assert_eq!(served["pod"]["name"], "web-7d9f");
    assert_eq!(served["role_arn"], format!("{BASE_ROLE_ARN}app-web"));
    let refused = &attributions[0];
    assert_eq!(refused["cgroup_id"], identity::cgroup_id(&batch_app)?.0);
    assert_eq!(refused["workload"], "shop/batch-x2");
    assert_eq!(refused["reason"], "no_role");
    Ok(())
}

/// `status --pod NAMESPACE/NAME` on a Kubernetes node, for each way a pod gets its role or none: its
/// own annotation, its ServiceAccount's, a role its namespace does not allow, and a pod the agent does
/// not know. Each names the source of the role, the rule, the pod's cgroups as the kernel has them
/// (ids the requests carry) and its last requests.
#[tokio::test(flavor = "multi_thread")]
async fn status_pod_explains_where_a_pods_role_comes_from_and_what_it_asked() -> Result<()> {
    if !privileged::can_run("status --pod") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (annotated, by_account, refused) = (node.pod()?, node.pod()?, node.pod()?);
    let dir = socket_dir()?;
    let socket = dir.path().join("run/status.sock");
    let cluster = KubeNode::start_with(
        node,
        Sts::Down,
        &[
            "--status-socket",
            socket.to_str().unwrap(),
            "--serviceaccount-roles",
            "--namespace-restrictions",
        ],
        |api| {
            api.apply_namespace(namespace_object(
                "shop",
                &[("iam.amazonaws.com/allowed-roles", r#"["app-*"]"#)],
            ));
            api.apply_service_account(service_account_object(
                "shop",
                "reports",
                &[("iam.amazonaws.com/role", "app-reports")],
            ));
            api.apply_service_account(service_account_object("shop", "default", &[]));
        },
    )?;
    cluster.api.apply_pod(pod_object(
        &annotated,
        "shop",
        "web",
        &[("iam.amazonaws.com/role", "app-web")],
    ));
    let mut reports = pod_object(&by_account, "shop", "reports", &[]);
    reports.spec.as_mut().unwrap().service_account_name = Some("reports".to_owned());
    cluster.api.apply_pod(reports);
    cluster.api.apply_pod(pod_object(
        &refused,
        "shop",
        "admin",
        &[("iam.amazonaws.com/role", "admin")],
    ));
    let containers = [
        annotated.container()?,
        by_account.container()?,
        refused.container()?,
    ];
    assert!(role_list_is(&annotated, &containers[0], 200).await);
    assert!(role_list_is(&by_account, &containers[1], 200).await);
    assert!(role_list_is(&refused, &containers[2], 403).await);

    let socket_args = ["--status-socket".as_ref(), socket.as_os_str()];
    let explain = |pod: &'static str| {
        let args = [
            socket_args[0],
            socket_args[1],
            OsStr::new("--pod"),
            OsStr::new(pod),
        ];
        let node = &cluster.node;
        async move {
            let json = status_json(node, &args).await?;
            let table = status(node, &args).await?;
            println!("$ interceptor status --pod {pod}\n{table}");
            anyhow::Ok((json, table))
        }
    };
    for ((pod, role, from, rule, refusal), (sim_pod, container)) in [
        (
            (
                "shop/web",
                Some("app-web"),
                "annotation iam.amazonaws.com/role of pod shop/web",
                "namespace \"shop\"",
                None,
            ),
            (&annotated, &containers[0]),
        ),
        (
            (
                "shop/reports",
                Some("app-reports"),
                "annotation iam.amazonaws.com/role of serviceaccount shop/reports",
                "namespace \"shop\"",
                None,
            ),
            (&by_account, &containers[1]),
        ),
        (
            (
                "shop/admin",
                None,
                "annotation iam.amazonaws.com/role of pod shop/admin",
                "allows \"[\\\"app-*\\\"]\"",
                Some("not allowed in namespace"),
            ),
            (&refused, &containers[2]),
        ),
    ] {
        let (json, table) = explain(pod).await?;
        let workload = &json["workload"];
        assert_eq!(workload["pod"]["uid"], sim_pod.uid.as_str(), "{json:#}");
        match role {
            Some(role) => assert_eq!(workload["role_arn"], format!("{BASE_ROLE_ARN}{role}"), "{json:#}"),
            None => assert!(workload["role_arn"].is_null(), "{json:#}"),
        }
        assert_eq!(workload["role_from"], from, "{json:#}");
        assert!(
            workload["rule"].as_str().is_some_and(|r| r.contains(rule)),
            "{json:#}"
        );
        if let Some(refusal) = refusal {
            assert!(
                workload["no_role"]
                    .as_str()
                    .is_some_and(|why| why.contains(refusal)),
                "{json:#}"
            );
        }
        // Its cgroups as the kernel has them: the pod's and its container's, with the container's id.
        let container_id = identity::cgroup_id(container)?.0;
        let cgroups = json["cgroups"].as_array().expect("cgroups");
        assert!(
            cgroups.iter().any(|cgroup| cgroup["id"] == container_id),
            "{json:#}"
        );
        assert!(
            cgroups
                .iter()
                .any(|cgroup| cgroup["path"] == sim_pod.slice().display().to_string()),
            "{json:#}"
        );
        // Its own requests only, the last one first.
        let requests = json["requests"].as_array().expect("requests");
        assert!(!requests.is_empty(), "{json:#}");
        assert!(
            requests
                .iter()
                .all(|request| request["cgroup_id"] == container_id),
            "{json:#}"
        );
        assert!(
            table.contains(from) && table.contains(&container_id.to_string()),
            "{table}"
        );
    }

    // A pod the agent does not know: said so, and the command fails.
    let mut command = Agent::status_command(&cluster.node)?;
    command.args(socket_args).args(["--pod", "shop/nobody"]);
    let out = tokio::process::Command::from(command).output().await?;
    assert!(!out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("not known to the agent on this node"), "{stdout}");
    assert!(stderr.contains("pod shop/nobody is not known"), "{stderr}");
    Ok(())
}
