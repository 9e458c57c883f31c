//! Who owns the programs, as the kernel reports it: an unpinned handle detaches them on drop; the agent
//! pins them, so they outlive it, the next agent takes them over, and `interceptor uninstall` removes
//! them.

use std::time::{Duration, Instant};

use interceptor::bpf::Interceptor;
use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN, WorkloadFile},
    deployed::{DeployedNode, ROLE_LIST, Sts, body_of, curl, status_of},
    kernel,
    lab::{StandIn, run},
    privileged,
    sim::SimNode,
};

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_handle_detaches_every_program() -> anyhow::Result<()> {
    if !privileged::can_run("detach") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let root = node.kubepods().to_path_buf();
    let attached = |root: &std::path::Path| -> anyhow::Result<Vec<Vec<u32>>> {
        kernel::AGENT_ATTACH_TYPES
            .iter()
            .map(|&attach_type| Ok(kernel::attached_programs(root, attach_type)?))
            .collect()
    };
    assert!(
        attached(&root)?.iter().all(Vec::is_empty),
        "nothing is attached before"
    );

    let interceptor = Interceptor::attach(&node.redirect_config())?;
    let while_attached = attached(&root)?;
    for (attach_type, ids) in kernel::AGENT_ATTACH_TYPES.iter().zip(&while_attached) {
        assert_eq!(ids.len(), 1, "one program at {attach_type:?}");
    }

    drop(interceptor);
    // The links go when their last file reference does. A process another test of this binary forks
    // at that moment holds copies of every descriptor until it execs (they are close-on-exec), so
    // the detach may finish a moment after the drop; it must finish.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !attached(&root)?.iter().all(Vec::is_empty) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        attached(&root)?.iter().all(Vec::is_empty),
        "programs remain after drop: {:?}",
        attached(&root)?
    );
    Ok(())
}

/// Each pinned link's id and the program it runs.
fn pinned_links(bpffs_dir: &std::path::Path) -> anyhow::Result<std::collections::BTreeMap<u32, u32>> {
    Ok(interceptor::bpf::inspect::pins(bpffs_dir)?
        .links
        .into_iter()
        .map(|link| (link.link_id, link.program_id))
        .collect())
}

fn programs_on(root: &std::path::Path) -> anyhow::Result<Vec<usize>> {
    kernel::AGENT_ATTACH_TYPES
        .iter()
        .map(|&attach_type| Ok(kernel::attached_programs(root, attach_type)?.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarting_agent_leaves_no_window_and_uninstall_removes_everything() -> anyhow::Result<()> {
    if !privileged::can_run("restart") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let mut t = DeployedNode::start(node, &[(pod.slice(), "alpha")], Sts::Down, &[])?;
    let root = t.node.kubepods().to_path_buf();
    let role_list = || curl(&pod, &container, &[ROLE_LIST]);
    assert_eq!(body_of(&role_list().await?), "alpha");
    assert_eq!(programs_on(&root)?, [1; kernel::AGENT_PROGRAMS]);

    // The agent dies: the pinned programs stay, and a pod's connection is refused, not served by the
    // node's metadata service.
    t.agent.kill()?;
    assert_eq!(
        programs_on(&root)?,
        [1; kernel::AGENT_PROGRAMS],
        "programs must outlive the agent"
    );
    let refused = role_list().await;
    assert!(
        refused.is_err(),
        "a pod got an answer with the agent down: {refused:?}"
    );
    assert_eq!(
        t.stand_in.tcp_accepted(),
        0,
        "a pod reached the node's metadata service"
    );

    // The next agent takes over: its programs go into the pinned links in place (the same links,
    // new programs), one of each.
    let links_before = pinned_links(&t.node.bpffs_dir())?;
    t.restart_agent()?;
    assert_eq!(body_of(&role_list().await?), "alpha");
    assert_eq!(programs_on(&root)?, [1; kernel::AGENT_PROGRAMS]);
    let links_after = pinned_links(&t.node.bpffs_dir())?;
    assert_eq!(
        links_after.keys().collect::<Vec<_>>(),
        links_before.keys().collect::<Vec<_>>(),
        "the same links"
    );
    for (link, program) in &links_after {
        assert_ne!(
            Some(program),
            links_before.get(link),
            "{link}: the old program runs on"
        );
    }

    // Uninstall removes everything: nothing attached, nothing pinned, pods reach the metadata service.
    t.agent.kill()?;
    let cgroup = t.node.cgroup("system.slice/uninstall.service")?;
    let mut uninstall = t.node.command(&cgroup, Agent::binary()?)?;
    uninstall
        .arg("uninstall")
        .arg("--bpffs-dir")
        .arg(t.node.bpffs_dir());
    let said = run(uninstall).await?;
    let removed = format!(
        "detached {} programs, removed {} maps",
        kernel::AGENT_PROGRAMS,
        kernel::AGENT_PINNED_MAPS
    );
    assert!(said.contains(&removed), "{said}");
    assert_eq!(programs_on(&root)?, [0; kernel::AGENT_PROGRAMS]);
    assert!(!t.node.bpffs_dir().exists());
    let direct = role_list().await?;
    assert_eq!(
        (status_of(&direct), body_of(&direct)),
        (200, StandIn::NODE_ROLE),
        "{direct}"
    );
    assert_eq!(
        t.stand_in.tcp_accepted(),
        1,
        "the node's metadata service answered the pod"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_mounts_bpffs_where_a_node_has_none() -> anyhow::Result<()> {
    if !privileged::can_run("bpffs mount") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let _stand_in = StandIn::start(&node)?;
    let workloads = WorkloadFile::new(&[(pod.slice(), "alpha")])?;
    // A mount namespace of the agent's own, where /sys/fs/bpf is not bpffs (a tmpfs stands there, so
    // the test does not depend on what the host mounted); the namespace, and whatever the agent pins
    // in it, go when the agent exits.
    let cgroup = node.cgroup("system.slice/interceptor.service")?;
    let no_bpffs = "mount -t tmpfs tmpfs /sys/fs/bpf && exec \"$0\" \"$@\"";
    let mut command = Agent::command_through(
        &node,
        &cgroup,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            no_bpffs,
        ],
    )?;
    Agent::node_flags(&mut command, &node, &workloads.path())
        .args(["--base-role-arn", BASE_ROLE_ARN])
        .args(["--bpffs-dir", "/sys/fs/bpf/interceptor"]);
    let agent = Agent::start(command)?;
    agent.wait_for_log("bpffs was not mounted: mounted it")?;
    let listed = curl(&pod, &container, &[ROLE_LIST]).await?;
    assert_eq!((status_of(&listed), body_of(&listed)), (200, "alpha"));
    Ok(())
}
