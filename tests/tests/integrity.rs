//! The data path tried as an attacker would: a stale connection record, an agent restarting inside its
//! own pod, a raw socket, a connection opened before the programs attached, full maps and a flood.
//! Each test asserts that no workload ever gets another's identity, and that the node's metadata
//! service hears nothing from a workload.

use std::{net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use interceptor::bpf::{Interceptor, MAX_RECORD_AGE};
use interceptor_common::{CgroupId, Counter};
use interceptor_tests::{
    agent::{Agent, BASE_ROLE_ARN, WorkloadFile},
    cgroup::id_of,
    deployed::{DeployedNode, ROLE_LIST, Sts, body_of, curl, eventually, status_of},
    lab::{Interactive, Lab, StandIn, run},
    privileged,
    sim::{METADATA_IP, Pod, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
/// The test client as a command in a pod's network and the given cgroup.
fn sim_client(pod: &Pod, cgroup: &Path, args: &[&str]) -> Result<std::process::Command> {
    let mut command = pod.command(cgroup, SIM_CLIENT)?;
    command.args(args);
    Ok(command)
}

/// A pod's credentials endpoint, straight at the agent's address.
fn direct_role_list(node: &SimNode) -> String {
    format!(
        "http://{}/latest/meta-data/iam/security-credentials/",
        node.agent_v4()
    )
}

/// The node's side of a pod network (the pod's default gateway).
fn gateway_of(pod: &Pod) -> String {
    let [a, b, c, _] = pod.network().ip.octets();
    format!("{a}.{b}.{c}.1")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_connection_record_never_lends_its_identity() -> Result<()> {
    if !privileged::can_run("stale record") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let victim = node.pod()?;
    let victim_container = victim.container()?;
    // A hostNetwork-like pod with no role, sharing the victim's network namespace and IP.
    let attacker = node.pod_sharing(&victim)?;
    let attacker_container = attacker.container()?;
    let outside_root = node.cgroup("system.slice/hostile.service")?;
    let mut t = DeployedNode::start(node, &[(victim.slice(), "app-b")], Sts::Down, &[])?;
    let direct = direct_role_list(&t.node);
    let from_port = |port: u16| ["--local-port".to_owned(), port.to_string()];

    // 1. The agent is down while the victim connects from port P; it comes back.
    t.agent.kill()?;
    let [flag, port] = from_port(41_001);
    let refused = curl(&victim, &victim_container, &[&flag, &port, ROLE_LIST]).await;
    assert!(refused.is_err(), "answered with the agent down: {refused:?}");
    t.restart_agent()?;
    // 2. A redirected SYN is lost while the agent is up (the gateway's MAC is wrong for a moment).
    let gateway = gateway_of(&victim);
    let neighbour = |args: &[&str]| -> Result<std::process::Command> {
        let mut ip = victim.command(&outside_root, "ip")?;
        ip.arg("neigh").args(args).args([gateway.as_str(), "dev", "eth0"]);
        Ok(ip)
    };
    run(neighbour(&[
        "replace",
        "lladdr",
        "02:00:00:00:00:01",
        "nud",
        "permanent",
    ])?)
    .await?;
    let [flag2, port2] = from_port(41_002);
    let lost = curl(
        &victim,
        &victim_container,
        &["--connect-timeout", "1", &flag2, &port2, ROLE_LIST],
    )
    .await;
    assert!(lost.is_err(), "a lost SYN was answered: {lost:?}");
    run(neighbour(&["del"])?).await?;

    // Whoever presents those 4-tuples now gets nothing of the victim's: no workload (the
    // hostNetwork-like one, or the victim's own container) can connect straight to the agent at all,
    // and a process outside the workload tree is refused.
    for (flag, port) in [(&flag, &port), (&flag2, &port2)] {
        for (pod, container) in [(&attacker, &attacker_container), (&victim, &victim_container)] {
            let from_workload = curl(pod, container, &[flag, port, &direct]).await;
            assert!(
                from_workload.is_err(),
                "a workload reached the agent directly: {from_workload:?}"
            );
        }
        let from_outside = curl(&victim, &outside_root, &[flag, port, &direct]).await?;
        assert_eq!(status_of(&from_outside), 403, "{from_outside}");
        assert!(!from_outside.contains("app-b"), "{from_outside}");
    }
    // The attacker's own requests through the redirect are its own: no role.
    let own = curl(&attacker, &attacker_container, &[ROLE_LIST]).await?;
    assert_eq!(status_of(&own), 404, "{own}");
    // And the victim is still served.
    let served = curl(&victim, &victim_container, &[ROLE_LIST]).await?;
    assert_eq!((status_of(&served), body_of(&served)), (200, "app-b"));
    // Every record went with its connection.
    let maps_empty = || async {
        let (_, metrics) = t.health("/metrics").await.unwrap_or_default();
        ["connects_by_cookie", "connects_by_tuple"]
            .iter()
            .all(|map| metrics.contains(&format!("interceptor_bpf_map_entries{{map=\"{map}\"}} 0")))
    };
    assert!(eventually(maps_empty).await, "records outlived their connections");
    assert_eq!(t.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_restarts_inside_its_pod_into_new_container_cgroups() -> Result<()> {
    if !privileged::can_run("daemonset restart") {
        return Ok(());
    }
    // A container runtime under cgroup v2 gives each container a cgroup namespace of its own, where
    // /proc/self/cgroup says only `/`: the last case runs the agent so (`unshare --cgroup`).
    for (discover, private_cgroupns) in [(false, false), (true, false), (true, true)] {
        restart_three_times_in_new_container_cgroups(discover, private_cgroupns)
            .await
            .with_context(|| {
                format!("with auto-discovery {discover}, private cgroup namespace {private_cgroupns}")
            })?;
    }
    Ok(())
}

/// The agent as a DaemonSet runs it: in a container cgroup under kubepods, in the node's network.
/// Each restart is a new container, with a new cgroup, while the previous agent's programs stay pinned.
async fn restart_three_times_in_new_container_cgroups(discover: bool, private_cgroupns: bool) -> Result<()> {
    let mut node = SimNode::new()?;
    let app = node.pod()?;
    let app_container = app.container()?;
    let agent_pod = node.pod()?;
    let _stand_in = StandIn::start(&node)?;
    let workloads = WorkloadFile::new(&[(app.slice(), "alpha")])?;
    let start_in = |cgroup: &Path| -> Result<Agent> {
        let wrapper: &[&str] = if private_cgroupns {
            &["unshare", "--cgroup"]
        } else {
            &[]
        };
        let mut command = Agent::command_through(&node, cgroup, wrapper)?;
        Agent::node_flags(&mut command, &node, &workloads.path());
        if discover {
            command.args(["--auto-discover-base-arn", "--auto-discover-default-role"]);
        } else {
            command.args(["--base-role-arn", BASE_ROLE_ARN]);
        }
        Agent::start(command)
    };
    let mut container = agent_pod.container()?;
    let mut agent = start_in(&container)?;
    for round in 1..=3 {
        let listed = curl(&app, &app_container, &[ROLE_LIST]).await?;
        assert_eq!(
            (status_of(&listed), body_of(&listed)),
            (200, "alpha"),
            "round {round}"
        );
        agent.kill()?;
        // The kubelet removes a dead container's cgroup and makes a new one for its successor.
        std::fs::remove_dir(&container)?;
        container = agent_pod.container()?;
        agent = start_in(&container).with_context(|| format!("restart {round}"))?;
        assert_eq!(
            exempt_cgroups(&node.bpffs_dir())?,
            [id_of(&container)],
            "only the running agent is exempt"
        );
    }
    let listed = curl(&app, &app_container, &[ROLE_LIST]).await?;
    assert_eq!((status_of(&listed), body_of(&listed)), (200, "alpha"));
    drop(agent);
    Ok(())
}

/// The cgroups in the pinned exempt set, read from bpffs as the kernel holds them.
fn exempt_cgroups(bpffs_dir: &Path) -> Result<Vec<CgroupId>> {
    let map = MapData::from_pin(bpffs_dir.join("v2/maps/EXEMPT_CGROUPS"))?;
    let set = HashMap::<_, u64, u8>::try_from(Map::HashMap(map))?;
    Ok(set
        .keys()
        .map(|key| key.map(CgroupId))
        .collect::<Result<_, _>>()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_syn_from_a_workload_never_reaches_the_metadata_service() -> Result<()> {
    if !privileged::can_run("raw socket") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let outside_root = node.cgroup("system.slice/raw.service")?;
    let capture = node.tcp_capture()?;
    let config = node.redirect_config();
    let lab = Lab::start(node, &config)?;
    let (src, dst) = (
        pod.network().ip.to_string(),
        SocketAddrV4::new(METADATA_IP, 80).to_string(),
    );
    let raw_syn = |cgroup: &Path, src_port: u16| {
        sim_client(
            &pod,
            cgroup,
            &["raw-syn", &src, &dst, "--src-port", &src_port.to_string()],
        )
    };

    // The workload's hand-made SYN first, then the same from outside the workload tree as a marker:
    // when the marker has arrived, the SYN had its chance to.
    run(raw_syn(&container, 42_001)?).await?;
    run(raw_syn(&outside_root, 42_002)?).await?;
    assert_eq!(
        capture.count_before(42_001, 42_002)?,
        0,
        "the workload's SYN reached the node"
    );
    assert_eq!(lab.counter(Counter::DroppedPacket), 1);
    assert_eq!(lab.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_opened_before_the_programs_attach_gets_no_byte_through_after() -> Result<()> {
    if !privileged::can_run("pre-attach connection") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let stand_in = StandIn::start(&node)?;
    let mut client = Interactive::spawn(sim_client(
        &pod,
        &container,
        &[
            "connect-then-get",
            "169.254.169.254:80",
            "--path",
            "/latest/user-data",
        ],
    )?)?;
    assert_eq!(client.line().await?, "connected");

    let interceptor = Interceptor::attach(&node.redirect_config())?;
    client.go().await?;
    assert_eq!(client.line().await?, "no response");
    assert!(
        stand_in.metadata_paths().is_empty(),
        "the request reached the metadata service"
    );
    assert!(
        interceptor.counter(Counter::DroppedPacket)? >= 1,
        "no packet was counted as dropped"
    );
    client.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_older_than_its_limit_attributes_nothing() -> Result<()> {
    if !privileged::can_run("stale age") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let config = node.redirect_config();
    let lab = Lab::start(node, &config)?;
    // The lab's agent looks the record up when the request arrives: one sent long after the connect
    // finds a record older than any connection being accepted now could have.
    let mut client = Interactive::spawn(sim_client(
        &pod,
        &container,
        &["connect-then-get", "169.254.169.254:80", "--path", "/late"],
    )?)?;
    assert_eq!(client.line().await?, "connected");
    tokio::time::sleep(MAX_RECORD_AGE + Duration::from_millis(500)).await;
    client.go().await?;
    assert_eq!(client.line().await?, "response=HTTP/1.1 200 OK");
    let calls = lab.agent_calls();
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0].attribution.is_none(),
        "a stale record attributed {:?}",
        calls[0].attribution
    );
    client.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn full_connection_maps_never_attribute_a_connection_to_another_cgroup() -> Result<()> {
    if !privileged::can_run("map pressure") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let (holder, asker) = (pod.container()?, pod.container()?);
    let mut config = node.redirect_config();
    config.connection_map_entries = 64;
    let lab = Lab::start(node, &config)?;

    // One workload fills both maps several times over with connections that never send a request.
    let mut held = Interactive::spawn(sim_client(
        &pod,
        &holder,
        &["hold", "169.254.169.254:80", "--count", "300"],
    )?)?;
    assert_eq!(held.line().await?, "opened=300 failed=0");

    // Another workload's requests: each attributed to it, or refused; never to the holder.
    run(sim_client(
        &pod,
        &asker,
        &["http", "169.254.169.254:80", "--count", "100"],
    )?)
    .await?;
    let (holder_id, asker_id) = (id_of(&holder), id_of(&asker));
    let calls = lab.agent_calls();
    assert_eq!(calls.len(), 100, "only the asker sent requests");
    let attributed: Vec<CgroupId> = calls
        .iter()
        .filter_map(|call| call.attribution)
        .map(|a| a.cgroup_id)
        .collect();
    assert!(
        !attributed.contains(&holder_id),
        "a request was attributed to the holder"
    );
    assert!(attributed.iter().all(|id| *id == asker_id));
    assert!(
        !attributed.is_empty(),
        "the asker's own connections are attributed"
    );
    held.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_flood_from_one_pod_does_not_starve_another() -> Result<()> {
    if !privileged::can_run("flood") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let flooder = node.pod()?;
    let flooding = flooder.container()?;
    let victim = node.pod()?;
    let victim_container = victim.container()?;
    let t = DeployedNode::start(
        node,
        &[(flooder.slice(), "flooder"), (victim.slice(), "victim")],
        Sts::Down,
        &[],
    )?;

    // The flooder holds 2,000 connections open (over its share: the rest are closed at accept), then
    // keeps opening new ones while the victim asks for its role list 300 times, a new connection each.
    let mut holder = Interactive::spawn(sim_client(
        &flooder,
        &flooding,
        &["hold", "169.254.169.254:80", "--count", "2000"],
    )?)?;
    let opened = holder.line().await?;
    let timed = |pod: &Pod, container: &Path, count: &str| {
        let path = "/latest/meta-data/iam/security-credentials/";
        sim_client(
            pod,
            container,
            &["timed", "169.254.169.254:80", "--path", path, "--count", count],
        )
    };
    let (churn, during) = tokio::join!(
        run(timed(&flooder, &flooding, "3000")?),
        run(timed(&victim, &victim_container, "300")?)
    );
    let (churn, during) = (churn?, during?);
    println!("flood: held {opened}, churn {churn}; victim during the flood: {during}");
    assert!(during.starts_with("ok=300 failed=0 "), "{during}");
    let p99_us: u64 = during
        .rsplit("p99_us=")
        .next()
        .and_then(|value| value.parse().ok())
        .context("no p99")?;
    assert!(p99_us < 1_000_000, "p99 {p99_us} us: past the SDKs' 1 s timeout");
    let (_, metrics) = t.health("/metrics").await?;
    assert!(
        metrics.contains("interceptor_metadata_connections_refused_total{reason=\"caller_limit\"}"),
        "the flood was not limited"
    );
    holder.finish().await?;
    Ok(())
}
