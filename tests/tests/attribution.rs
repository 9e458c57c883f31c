//! Attribution by cgroup, not by address: workloads sharing one network namespace (one IP, as
//! hostNetwork pods do) are told apart on every connection, and a cgroup id leads back to its pod.

use std::{collections::HashMap, path::Path};

use interceptor_tests::{
    cgroup::id_of,
    lab::{Lab, run},
    privileged,
    sim::SimNode,
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const CONNECTIONS_EACH: usize = 1000;

#[tokio::test(flavor = "multi_thread")]
async fn workloads_sharing_one_ip_are_attributed_to_their_own_cgroups() -> anyhow::Result<()> {
    if !privileged::can_run("shared-ip attribution") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod_a = node.pod()?;
    let pod_b = node.pod_sharing(&pod_a)?;
    let (container_a, container_b) = (pod_a.container()?, pod_b.container()?);
    let config = node.redirect_config();
    let lab = Lab::start(node, &config)?;

    let client = |pod: &interceptor_tests::sim::Pod, container, tag: &str| -> anyhow::Result<_> {
        let mut command = pod.command(container, SIM_CLIENT)?;
        command.args(["http", "169.254.169.254:80", "--path", &format!("/who/{tag}")]);
        command.args(["--count", &CONNECTIONS_EACH.to_string()]);
        Ok(command)
    };
    // Both run at once, so their connections interleave.
    let (a, b) = tokio::join!(
        run(client(&pod_a, &container_a, "a")?),
        run(client(&pod_b, &container_b, "b")?)
    );
    a?;
    b?;

    let expected = HashMap::from([("/who/a", id_of(&container_a)), ("/who/b", id_of(&container_b))]);
    let calls = lab.agent_calls();
    assert_eq!(calls.len(), 2 * CONNECTIONS_EACH);
    let mut mistakes = 0;
    for call in &calls {
        assert_eq!(
            call.exchange.peer.ip(),
            pod_a.network().ip,
            "both workloads share one IP"
        );
        let attributed = call.attribution.map(|found| found.cgroup_id);
        if attributed != Some(expected[call.exchange.path.as_str()]) {
            mistakes += 1;
        }
    }
    assert_eq!(
        mistakes, 0,
        "connections attributed to the wrong cgroup or not at all"
    );
    assert_eq!(lab.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_id_resolves_to_its_kubelet_path_and_pod() -> anyhow::Result<()> {
    if !privileged::can_run("cgroup id to path") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let mount = interceptor::identity::cgroup2_mount()?;
    let paths = interceptor::identity::CgroupPaths::new(mount.clone(), std::num::NonZeroUsize::MIN)?;

    let path = paths.path_of(id_of(&container))?;
    assert_eq!(Path::new(path.as_str()), container.strip_prefix(&mount)?);
    let parsed = interceptor::identity::parse_pod_cgroup(path.as_str()).expect("a kubelet path");
    assert_eq!(parsed.pod_uid.as_str(), pod.uid);
    let id_in_path = container.file_name().unwrap().to_string_lossy();
    let container_id = parsed.container_id.expect("a container scope");
    assert_eq!(
        id_in_path,
        format!("cri-containerd-{}.scope", container_id.as_str())
    );

    // A second lookup of another id evicts the first from the one-entry cache; both still resolve.
    let slice = paths.path_of(id_of(pod.slice()))?;
    assert_eq!(Path::new(slice.as_str()), pod.slice().strip_prefix(&mount)?);
    assert_eq!(paths.path_of(id_of(&container))?, path);

    // A removed cgroup's id names nothing.
    let gone = node.cgroup("gone.slice")?;
    let gone_id = id_of(&gone);
    std::fs::remove_dir(&gone)?;
    assert!(matches!(
        paths.path_of(gone_id),
        Err(interceptor::identity::CgroupError::UnknownId(_))
    ));
    Ok(())
}
