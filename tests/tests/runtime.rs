//! The agent as a real container: its image under the tests' containerd (CRI, runc, bridge CNI), with
//! the chart's DaemonSet translated as the kubelet translates it, serving workload containers made
//! through CRI under the kubelet's cgroup parents.

use std::{collections::BTreeMap, os::unix::fs::MetadataExt, time::Duration};

use anyhow::{Context, Result, ensure};
use aya::util::KernelVersion;
use interceptor_tests::{
    cri_node::{self, CriNode},
    daemonset_node,
    deployed::Sts,
    kernel,
    lab::StandIn,
    probe::{Outcome, Probe, now_us},
    sim::SimNode,
};
use serde_json::Value;

const SHOP_ROLE: &str = "shop-reader";
const BILLING_ROLE: &str = "billing-writer";
const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_container_runs_with_exactly_the_charts_security_context_and_names_pods_by_their_cgroups()
-> Result<()> {
    // No STS: what is checked here is the runtime's and the kernel's part, which the VMs run too.
    let Some((node, shop)) = node_with_shop_pod("the agent container's security context", Sts::Down).await?
    else {
        return Ok(());
    };
    let listed = node.metadata_get(shop, ROLE_LIST).await?;
    ensure!(listed.as_deref() == Ok(SHOP_ROLE), "shop/cart listed {listed:?}");
    check_status_names(&node, &[(shop, SHOP_ROLE)]).await?;

    let agent = node.agent()?;
    let agent_pid = agent.pid()?;
    let proc_status = std::fs::read_to_string(format!("/proc/{agent_pid}/status"))?;
    let fields: BTreeMap<&str, &str> = proc_status
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key, value.trim()))
        .collect();
    println!(
        "the agent's CapEff {}, CapBnd {}, Seccomp {}, NoNewPrivs {}",
        fields["CapEff"], fields["CapBnd"], fields["Seccomp"], fields["NoNewPrivs"]
    );
    ensure!(
        fields["Seccomp"] == "2",
        "the agent runs without a seccomp filter"
    );
    ensure!(fields["NoNewPrivs"] == "1", "the agent can gain privileges");
    let expected = cri_node::capability_mask(&agent.granted_capabilities())?;
    ensure!(
        u64::from_str_radix(fields["CapEff"], 16)? == expected,
        "CapEff {} is not the chart's list ({expected:016x})",
        fields["CapEff"]
    );

    // containerd gives a container a cgroup namespace of its own on a cgroup v2 host only; there the
    // agent finds its own cgroup through a cgroup2 mount made inside that namespace.
    let pure_v2 = interceptor_tests::containerd::cgroup_v1_hierarchies()?.is_empty();
    let namespace_of = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/cgroup")).map(|meta| meta.ino());
    let own_namespace = namespace_of(&agent_pid.to_string())? != namespace_of("self")?;
    println!(
        "a cgroup {} host, the agent in a cgroup namespace of its own: {own_namespace}",
        if pure_v2 { "v2" } else { "hybrid" }
    );
    ensure!(
        own_namespace == pure_v2,
        "containerd gives a cgroup namespace of its own exactly on a cgroup v2 host"
    );
    let exempted =
        daemonset_node::log_entry(&json_lines(&node.agent_log()), "exempted the agent's own cgroup")?;
    let agent_cgroup_id = interceptor::identity::cgroup_id(&agent.cgroup()?)?.0;
    ensure!(
        exempted["cgroup_id"] == agent_cgroup_id,
        "the agent exempted {exempted}, not its container's cgroup {agent_cgroup_id}"
    );

    let mountinfo = std::fs::read_to_string(format!("/proc/{agent_pid}/mountinfo"))?;
    println!("the agent's mounts:\n{mountinfo}");
    check_runtime_mounts(&mountinfo, pure_v2)?;
    let written = written_outside_mounts(&mountinfo)?;
    ensure!(
        written.is_empty(),
        "the agent wrote outside its mounts, into its container's layer: {written:?}"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_made_through_cri_get_their_own_roles_credentials_from_the_agent_container() -> Result<()> {
    let Some((mut node, shop)) =
        node_with_shop_pod("CRI pods get credentials from the agent container", Sts::Moto).await?
    else {
        return Ok(());
    };
    let billing = node
        .run_workload("billing", "ledger", &[(ROLE_ANNOTATION, BILLING_ROLE)], false)
        .await?;
    let mut access_keys = Vec::new();
    for (index, role) in [(shop, SHOP_ROLE), (billing, BILLING_ROLE)] {
        let listed = node.metadata_get(index, ROLE_LIST).await?;
        ensure!(
            listed.as_deref() == Ok(role),
            "{} listed {listed:?}, expected {role}",
            node.workloads[index].name()
        );
        let credentials = node
            .metadata_get(index, &format!("{ROLE_LIST}{role}"))
            .await?
            .map_err(anyhow::Error::msg)?;
        ensure!(
            !credentials.contains(StandIn::NODE_SECRET) && !credentials.contains(StandIn::NODE_ACCESS_KEY),
            "the node's credentials reached {}",
            node.workloads[index].name()
        );
        let credentials: Value = serde_json::from_str(&credentials)?;
        ensure!(credentials["Code"] == "Success", "{credentials}");
        access_keys.push(credentials["AccessKeyId"].clone());
    }
    ensure!(
        access_keys[0] != access_keys[1],
        "two roles, one key: {access_keys:?}"
    );
    check_status_names(&node, &[(shop, SHOP_ROLE), (billing, BILLING_ROLE)]).await?;
    node.shutdown().await
}

/// A node of the tests' containerd with the chart's agent container running and the pod `shop/cart`
/// (role `shop-reader`) made through CRI; `None` where the runtime tests cannot run.
async fn node_with_shop_pod(test: &str, sts: Sts) -> Result<Option<(CriNode, usize)>> {
    let Some(image) = cri_node::agent_image(test) else {
        return Ok(None);
    };
    let mut node = CriNode::start(SimNode::new()?, &image, sts).await?;
    node.start_agent(&[], |_| {}).await?;
    let shop = node
        .run_workload("shop", "cart", &[(ROLE_ANNOTATION, SHOP_ROLE)], false)
        .await?;
    Ok(Some((node, shop)))
}

/// `interceptor status`, run in the agent's container as `kubectl exec ds/interceptor -- interceptor
/// status` runs it (the README's troubleshooting command), works; its JSON names each workload's
/// requests by the cgroup containerd made for its container, with its own role.
async fn check_status_names(node: &CriNode, workloads: &[(usize, &str)]) -> Result<()> {
    let status = node.exec_in_agent(&["interceptor", "status"]).await?;
    ensure!(
        status.exit_code == 0,
        "`interceptor status` in the agent container exited {}: {}{}",
        status.exit_code,
        status.stdout_text(),
        status.stderr_text()
    );
    println!("interceptor status:\n{}", status.stdout_text());
    let report = node
        .exec_in_agent(&["interceptor", "status", "--output", "json"])
        .await?;
    let report: Value = serde_json::from_slice(&report.stdout).context("status --output json")?;
    // The runtime gives the agent a PID namespace of its own: SIGTERM reaches only its own handler.
    ensure!(
        report["agent"]["pid"] == 1,
        "the agent is not process 1 of its container: {report}"
    );
    let attributions = report["agent"]["attributions"]
        .as_array()
        .context("no attributions in the status")?;
    for &(index, role) in workloads {
        let workload = &node.workloads[index];
        let cgroup_id = interceptor::identity::cgroup_id(&workload.cgroup)?.0;
        println!(
            "{}: cgroup {} (id {cgroup_id})",
            workload.name(),
            workload.cgroup.display()
        );
        let served: Vec<&Value> = attributions
            .iter()
            .filter(|attribution| attribution["cgroup_id"] == cgroup_id)
            .collect();
        ensure!(
            !served.is_empty(),
            "no request of cgroup {cgroup_id} in {attributions:?}"
        );
        for attribution in served {
            ensure!(
                attribution["workload"] == workload.name()
                    && attribution["role_arn"]
                        .as_str()
                        .is_some_and(|arn| arn.ends_with(&format!(":role/{role}"))),
                "{}'s request was attributed as {attribution}",
                workload.name()
            );
        }
        check_status_pod(node, &workload.name(), role, cgroup_id).await?;
    }
    Ok(())
}

/// `interceptor status --pod` in the agent's container explains `pod`: its role, and among its cgroups,
/// read from the tree as the agent's container sees it, the one containerd made (`cgroup_id`).
async fn check_status_pod(node: &CriNode, pod: &str, role: &str, cgroup_id: u64) -> Result<()> {
    let explained = node
        .exec_in_agent(&["interceptor", "status", "--pod", pod, "--output", "json"])
        .await?;
    ensure!(
        explained.exit_code == 0,
        "`interceptor status --pod {pod}` exited {}: {}",
        explained.exit_code,
        explained.stderr_text()
    );
    let report: Value = serde_json::from_slice(&explained.stdout).context("status --pod --output json")?;
    ensure!(
        report["workload"]["role_arn"]
            .as_str()
            .is_some_and(|arn| arn.ends_with(&format!(":role/{role}"))),
        "{report}"
    );
    ensure!(
        report["cgroups"]
            .as_array()
            .is_some_and(|cgroups| cgroups.iter().any(|cgroup| cgroup["id"] == cgroup_id)),
        "the container's cgroup {cgroup_id} is not among {pod}'s: {report}"
    );
    Ok(())
}

/// The JSON of the agent's CRI log lines (`<time> <stream> <tag> <line>`).
fn json_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.find('{').map(|start| line[start..].to_owned()))
        .collect()
}

/// What deploy/README.md says the runtime does beyond the pod spec: it adds `/etc/hosts`,
/// `/etc/hostname`, `/etc/resolv.conf` and `/dev/shm`; and the read-only `/sys/fs/cgroup` hostPath is
/// not read-only below it, where a hybrid host mounts its cgroup2.
fn check_runtime_mounts(mountinfo: &str, pure_v2: bool) -> Result<()> {
    let options_of = |point: &str| {
        mountinfo
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.get(4) == Some(&point))
            .and_then(|fields| fields.get(5).map(|options| options.split(',').any(|o| o == "ro")))
    };
    for added in ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/shm"] {
        ensure!(options_of(added).is_some(), "the runtime mounted no {added}");
    }
    ensure!(
        options_of("/sys/fs/cgroup") == Some(true),
        "/sys/fs/cgroup is not read-only"
    );
    if !pure_v2 {
        ensure!(
            options_of("/sys/fs/cgroup/unified") == Some(false),
            "the hybrid host's cgroup2 below the read-only hostPath is not writable, as deploy/README.md says"
        );
    }
    Ok(())
}

/// What a container's writable layer (its overlay's upperdir) holds beyond the mount points runc
/// made there: files the container wrote on its root. Empty for a read-only root. The native
/// snapshotter (where the tests' containerd runs on overlayfs) has no such layer: then only the root's
/// read-only mount is checked.
fn written_outside_mounts(mountinfo: &str) -> Result<Vec<String>> {
    let root = mountinfo
        .lines()
        .find(|line| line.split_whitespace().nth(4) == Some("/"))
        .context("no root mount")?;
    ensure!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|options| options.split(',').any(|o| o == "ro")),
        "the root is mounted read-write: {root}"
    );
    let fs_type = root
        .split(" - ")
        .nth(1)
        .and_then(|fs| fs.split_whitespace().next());
    if fs_type != Some("overlay") {
        println!("the root is no overlay ({fs_type:?}): no writable layer to look into");
        return Ok(Vec::new());
    }
    let upper = root
        .split(',')
        .find_map(|option| option.strip_prefix("upperdir="))
        .context("the root is no overlay with an upperdir")?;
    let mount_points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .collect();
    let mut written = Vec::new();
    let mut pending = vec![std::path::PathBuf::from(upper)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let in_container = format!("/{}", path.strip_prefix(upper)?.display());
            // A mount point, or a directory on the way to one.
            let needed = mount_points
                .iter()
                .any(|point| *point == in_container || point.starts_with(&format!("{in_container}/")));
            if !needed {
                written.push(in_container);
            } else if path.is_dir() {
                pending.push(path);
            } else if path.metadata()?.len() > 0 {
                written.push(format!("{in_container} (a mount point with content)"));
            }
        }
    }
    Ok(written)
}

/// How the kubelet ends the agent's container: a crash (SIGKILL, as `StopContainer` without grace),
/// or a rollout (SIGTERM with the pod's grace period, which the agent must not wait out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    Crash,
    Rollout,
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_container_restarts_leave_no_window_and_no_misattribution() -> Result<()> {
    let Some((mut node, shop)) = node_with_shop_pod("agent container restarts", Sts::Down).await? else {
        return Ok(());
    };
    let billing = node
        .run_workload("billing", "ledger", &[(ROLE_ANNOTATION, BILLING_ROLE)], false)
        .await?;
    let probes = [(shop, SHOP_ROLE), (billing, BILLING_ROLE)]
        .into_iter()
        .map(|(index, role)| {
            let command = node.command_in_workload(index, interceptor_tests::built_binary("sim-client")?)?;
            Ok((Probe::start(command, ROLE_LIST, Duration::from_secs(1))?, role))
        })
        .collect::<Result<Vec<_>>>()?;
    for (probe, role) in &probes {
        probe.wait_for(0, |outcome| answered(outcome, role)).await?;
    }

    let mut windows = Vec::new();
    for restart in [Restart::Crash, Restart::Rollout, Restart::Crash] {
        let since = now_us();
        match restart {
            Restart::Crash => {
                node.restart_agent(Duration::ZERO).await?;
            }
            Restart::Rollout => {
                let stopped_in = node.restart_agent(ROLLOUT_GRACE).await?;
                println!("the agent stopped on SIGTERM in {stopped_in:?}");
                ensure!(
                    stopped_in < ROLLOUT_GRACE / 2,
                    "the agent took {stopped_in:?} to stop on SIGTERM (grace {ROLLOUT_GRACE:?})"
                );
            }
        }
        for (probe, role) in &probes {
            probe.wait_for(since, |outcome| answered(outcome, role)).await?;
        }
        windows.push((restart, since, now_us()));
        println!("{restart:?}: both pods answered again");
    }
    // A killed agent cuts off the connections it had accepted (reset, or closed before an answer)
    // and leaves its address unserved ("connection refused"); one stopped with SIGTERM refuses new
    // connects in the kernel first (EPERM) and answers those made.
    let during = |wanted: Restart, at_us: u128| {
        windows
            .iter()
            .any(|&(restart, since, until)| restart == wanted && (since..=until).contains(&at_us))
    };
    let stopping = node.agent_log().contains("stopping: metadata connects refused");
    ensure!(
        stopping,
        "the agent stopped by SIGTERM did not log that it refuses and drains"
    );

    let mut tally = BTreeMap::new();
    for (probe, role) in probes {
        for attempt in probe.finish().await? {
            let kind = match &attempt.outcome {
                Outcome::Answer { status: 200, body } if body == role => "own role",
                Outcome::Failed(error)
                    if error.contains("Connection refused") && !during(Restart::Rollout, attempt.at_us) =>
                {
                    "connection refused"
                }
                Outcome::Failed(error) if cut_off(error) && during(Restart::Crash, attempt.at_us) => {
                    "cut off by the killed agent"
                }
                outcome if outcome.refused_by_the_programs() => "refused by the programs",
                other => anyhow::bail!(
                    "a pod of {role} got {other:?} at {} µs; the restarts (kind, from, to): {windows:?}",
                    attempt.at_us
                ),
            };
            *tally.entry((role, kind)).or_insert(0) += 1;
        }
    }
    println!("attempts through three restarts: {tally:?}");
    ensure!(
        node.stand_in.metadata_paths().is_empty(),
        "the node's metadata service was reached: {:?}",
        node.stand_in.metadata_paths()
    );
    node.shutdown().await
}

/// The rendered pod's `terminationGracePeriodSeconds` is Kubernetes' default.
const ROLLOUT_GRACE: Duration = Duration::from_secs(30);

/// A connection that was accepted and closed before an answer.
fn cut_off(error: &str) -> bool {
    ["Connection reset", "Broken pipe", "response without a head"]
        .iter()
        .any(|cut| error.contains(cut))
}

fn answered(outcome: &Outcome, role: &str) -> bool {
    matches!(outcome, Outcome::Answer { status: 200, body } if body == role)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_capability_of_the_chart_is_needed() -> Result<()> {
    let Some(image) = cri_node::agent_image("each capability of the chart is needed") else {
        return Ok(());
    };
    let pod_spec = daemonset_node::DaemonSetSpec::chart(daemonset_node::DEFAULT_VALUES)?.pod_spec;
    let chart_capabilities = interceptor_tests::chart::strings(
        &pod_spec["containers"][0]["securityContext"]["capabilities"]["add"],
    );
    let mut node = CriNode::start(SimNode::new()?, &image, Sts::Down).await?;
    let shop = node
        .run_workload("shop", "cart", &[(ROLE_ANNOTATION, SHOP_ROLE)], false)
        .await?;
    let kernel = KernelVersion::current()?;
    let mut table = Vec::new();
    for capability in &chart_capabilities {
        let started = node
            .start_agent(&[], |config| cri_node::take_capability(config, capability))
            .await;
        let failure = match started {
            // The runtime's failure, not the agent's: the test cannot tell what the capability does.
            Err(err) if node.agent_log().is_empty() => return Err(err.context("the agent never ran")),
            Err(err) => Some(format!(
                "the agent does not start: {}",
                last_error(&node.agent_log(), &err)
            )),
            Ok(()) => what_fails_in_service(&node, shop).await?,
        };
        // Each trial starts from a clean node: no agent, nothing attached or pinned.
        node.remove_agent().await?;
        table.push((capability, failure));
    }
    node.shutdown().await?;
    println!("capability table on kernel {kernel}:");
    for (capability, failure) in &table {
        println!(
            "| {capability} | {} |",
            failure.as_deref().unwrap_or("nothing fails")
        );
    }
    let wrong: Vec<_> = table
        .iter()
        .filter(|(capability, failure)| failure.is_some() != needed_on(capability, kernel))
        .map(|(capability, _)| capability)
        .collect();
    ensure!(
        wrong.is_empty(),
        "on kernel {kernel}, taking away {wrong:?} did not do what the chart's comments say"
    );
    Ok(())
}

/// Whether the agent needs `capability` on `kernel`. `NET_ADMIN`: attaching a cgroup_skb program asks
/// for it itself before Linux 6.9, whose BPF token work lets `SYS_ADMIN` stand in for it.
fn needed_on(capability: &str, kernel: KernelVersion) -> bool {
    capability != "NET_ADMIN" || kernel < KernelVersion::new(6, 9, 0)
}

/// With the agent ready: whether pod `shop` still gets its role and `interceptor status` still works.
async fn what_fails_in_service(node: &CriNode, shop: usize) -> Result<Option<String>> {
    if let Err(error) = node.metadata_get(shop, ROLE_LIST).await? {
        return Ok(Some(format!("a pod's role list fails: {error}")));
    }
    let status = node.exec_in_agent(&["interceptor", "status"]).await?;
    if status.exit_code != 0 {
        return Ok(Some(format!(
            "`interceptor status` exits {}: {}",
            status.exit_code,
            status.stderr_text().trim()
        )));
    }
    Ok(None)
}

/// The agent's last error from its log (JSON lines under CRI's prefix), else the start's error.
fn last_error(log: &str, start_error: &anyhow::Error) -> String {
    json_lines(log)
        .iter()
        .rev()
        .find_map(|line| {
            let entry: Value = serde_json::from_str(line).ok()?;
            (entry["level"] == "ERROR").then(|| entry.to_string())
        })
        .or_else(|| log.lines().last().map(str::to_owned))
        .unwrap_or_else(|| format!("{start_error:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_uninstall_daemonsets_container_leaves_nothing_attached_or_pinned() -> Result<()> {
    let Some((mut node, shop)) = node_with_shop_pod("the uninstall DaemonSet's container", Sts::Down).await?
    else {
        return Ok(());
    };
    ensure!(node.metadata_get(shop, ROLE_LIST).await?.as_deref() == Ok(SHOP_ROLE));
    let cgroup_root = std::path::PathBuf::from(node.agent_cgroup_root()?);
    let pins = node.containerd.path_in_mount_namespace(cri_node::AGENT_BPFFS_DIR);
    ensure!(
        pins.read_dir()?.next().is_some(),
        "the agent pinned nothing in {}",
        pins.display()
    );

    // The documented order: the agent's DaemonSet is replaced by the uninstall one on each node.
    let agent_pod = node.agent.take().context("the agent runs")?.pod;
    node.cri.stop_pod_sandbox(&agent_pod.sandbox_id).await?;
    node.cri.remove_pod_sandbox(&agent_pod.sandbox_id).await?;
    let pod_spec = node.rendered_pod_spec_of(
        "interceptor-uninstall",
        &[
            "--set",
            "uninstall.enabled=true",
            "--set-string",
            &format!("uninstall.pauseImage={}", cri_node::WORKLOAD_IMAGE),
        ],
    )?;
    let (exit_code, log) = node.run_init_container(&pod_spec, "uninstall").await?;
    println!("the uninstall container exited {exit_code}:\n{log}");
    ensure!(exit_code == 0, "the uninstall container failed");

    for attach_type in kernel::AGENT_ATTACH_TYPES {
        let attached = kernel::attached_programs(&cgroup_root, attach_type)?;
        ensure!(
            attached.is_empty(),
            "{attach_type:?}: programs {attached:?} still attached"
        );
    }
    let left: Vec<_> = match pins.read_dir() {
        Ok(entries) => entries.filter_map(|entry| Some(entry.ok()?.path())).collect(),
        Err(_) => Vec::new(),
    };
    ensure!(left.is_empty(), "pins left: {left:?}");
    // Nothing intercepts any more: the pod's metadata connection reaches the node's service.
    let reached = node.metadata_get(shop, "/latest/meta-data/instance-id").await?;
    ensure!(
        reached.as_deref() == Ok(StandIn::INSTANCE_ID),
        "after the uninstall the pod got {reached:?}, not the node's metadata service"
    );
    node.shutdown().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_network_container_cannot_take_the_agents_ports_while_it_runs_or_after_it_crashed()
-> Result<()> {
    let Some((mut node, shop)) = node_with_shop_pod("squatting through CRI", Sts::Down).await? else {
        return Ok(());
    };
    let daemon = node.run_workload("kube-system", "node-daemon", &[], true).await?;
    // A node daemon's metadata paths still reach the node's service, through the agent.
    let instance_id = node.metadata_get(daemon, "/latest/meta-data/instance-id").await?;
    ensure!(
        instance_id.as_deref() == Ok(StandIn::INSTANCE_ID),
        "the node daemon got {instance_id:?}"
    );
    let squat = [
        "/bin/sim-client",
        "squat",
        "10.99.0.1:8181",
        "0.0.0.0:8181",
        "[::]:8181",
        "0.0.0.0:9181",
    ];
    let while_running = node.exec_in_workload(daemon, &squat).await?;
    println!("while the agent runs:\n{while_running}");
    ensure!(
        while_running.contains("bound=0") && !while_running.contains("\nbound "),
        "a hostNetwork container took an agent's port: {while_running}"
    );

    // The kubelet's view of a crash before the restart: the container is gone, nothing listens.
    let agent = node.agent()?.pod.container_id().to_owned();
    node.cri.stop_container(&agent, Duration::ZERO).await?;
    let while_down = node.exec_in_workload(daemon, &squat).await?;
    println!("while the agent is down:\n{while_down}");
    ensure!(
        while_down.contains("bound=0") && while_down.matches("Operation not permitted").count() == 4,
        "with the agent down, a hostNetwork container took an agent's port: {while_down}"
    );
    let refused = node.metadata_get(shop, ROLE_LIST).await?;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|error| error.contains("Connection refused")),
        "with the agent down, the pod got {refused:?}"
    );
    node.shutdown().await
}
