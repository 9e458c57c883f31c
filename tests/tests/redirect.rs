//! The connect hooks on the real kernel: what is redirected to the agent and attributed, what passes
//! untouched, and what a redirected socket reports as its peer.

use std::{net::SocketAddr, path::PathBuf};

use interceptor_common::Counter;
use interceptor_tests::{
    cgroup::id_of,
    lab::{OnePod, StandIn, curl_args, run},
    privileged,
    sim::METADATA_IP,
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
const METADATA_URL: &str = "http://169.254.169.254/latest/meta-data/";

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_connection_to_the_metadata_ip_reaches_the_agent_and_is_attributed() -> anyhow::Result<()> {
    if !privileged::can_run("redirect") {
        return Ok(());
    }
    let t = OnePod::start(|_, _| Ok(()))?;

    let body = run(t.curl(METADATA_URL)?).await?;

    let cgroup_id = id_of(&t.container);
    assert_eq!(body, format!("agent cgroup={}", cgroup_id.0));
    let calls = t.lab.agent_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].exchange.path, "/latest/meta-data/");
    assert_eq!(calls[0].exchange.peer.ip(), t.pod.network().ip);
    let attribution = calls[0].attribution.expect("the connection is attributed");
    assert_eq!(attribution.cgroup_id, cgroup_id);
    assert_ne!(attribution.socket_cookie.0, 0);
    assert_ne!(attribution.netns_cookie.0, 0);
    assert_ne!(attribution.pid, 0);
    assert_eq!(attribution.original_dst, SocketAddr::from((METADATA_IP, 80)));
    assert_eq!(
        t.lab.stand_in.tcp_accepted(),
        0,
        "a redirected connection reached the stand-in"
    );
    assert_eq!(t.lab.counter(Counter::Redirected), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_direct_connection_to_the_agent_is_refused_from_a_workload_and_unattributed_from_elsewhere()
-> anyhow::Result<()> {
    if !privileged::can_run("direct") {
        return Ok(());
    }
    let t = OnePod::start(|_, _| Ok(()))?;
    let direct = format!("http://{}/latest/meta-data/", t.lab.config.agent_v4);

    // From the workload: the connect itself fails, in the pod's network and in the node's (a
    // hostNetwork pod), and through an unspecified address bound to the node's (what reaches a
    // listener on the node's address without naming it).
    let refused = run(t.curl(&direct)?).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|err| err.to_string().contains("Couldn't connect")),
        "{refused:?}"
    );
    let mut host_network = t.lab.node.command(&t.container, "curl")?;
    host_network
        .args(["--interface", "10.99.0.1"])
        .args(curl_args("http://0.0.0.0:8181/latest/meta-data/"));
    let refused = run(host_network).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|err| err.to_string().contains("Couldn't connect")),
        "{refused:?}"
    );
    assert_eq!(t.lab.counter(Counter::DirectRefused), 2);
    assert_eq!(t.lab.agent_accepted(), 0);

    // From outside the workload tree: the agent accepts it and finds no record.
    let outside_root = t.lab.node.cgroup("system.slice/outside.service")?;
    let mut outside = t.pod.command(&outside_root, "curl")?;
    outside.args(curl_args(&direct));
    assert_eq!(run(outside).await?, "agent unattributed");
    assert!(t.lab.agent_calls()[0].attribution.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn other_traffic_passes_untouched() -> anyhow::Result<()> {
    if !privileged::can_run("untouched") {
        return Ok(());
    }
    let mut exempt = PathBuf::new();
    let t = OnePod::start(|config, pod| {
        exempt = pod.container()?;
        config.exempt_cgroups.push(id_of(&exempt));
        Ok(())
    })?;
    let outside_root = t.lab.node.cgroup("system.slice/outside.service")?;
    let curl_from = |cgroup: &std::path::Path, url: &str| -> anyhow::Result<std::process::Command> {
        let mut command = t.pod.command(cgroup, "curl")?;
        command.args(curl_args(url));
        Ok(command)
    };

    let other_port = format!("http://169.254.169.254:{}/", StandIn::OTHER_PORT);
    assert_eq!(run(t.curl(&other_port)?).await?, "stand-in other port");
    assert_eq!(run(t.curl("http://10.99.0.1/")?).await?, "stand-in node");
    assert_eq!(
        run(curl_from(&outside_root, METADATA_URL)?).await?,
        StandIn::METADATA_BODY
    );
    assert_eq!(
        run(curl_from(&exempt, METADATA_URL)?).await?,
        StandIn::METADATA_BODY
    );
    let mut udp = t.command(SIM_CLIENT)?;
    udp.args(["udp", "169.254.169.254:80", "udp-from-pod"]);
    run(udp).await?;
    assert_eq!(t.lab.stand_in.recv_udp()?, "udp-from-pod");

    assert_eq!(t.lab.agent_accepted(), 0, "untouched traffic reached the agent");
    assert_eq!(t.lab.stand_in.tcp_accepted(), 4);
    assert_eq!(t.lab.counter(Counter::Exempt), 1);
    assert_eq!(t.lab.counter(Counter::Redirected), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirected_socket_reports_the_metadata_address_as_its_peer() -> anyhow::Result<()> {
    if !privileged::can_run("getpeername") {
        return Ok(());
    }
    let t = OnePod::start(|_, _| Ok(()))?;
    let cgroup_id = id_of(&t.container).0;

    for addr in [
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "[::ffff:169.254.169.254]:80",
    ] {
        let mut client = t.command(SIM_CLIENT)?;
        client.args(["peer", addr]);
        let output = run(client).await?;
        assert_eq!(
            output,
            format!("peer={addr}\nbody=agent cgroup={cgroup_id}"),
            "connect to {addr}"
        );
    }
    assert_eq!(t.lab.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_and_ipv4_mapped_connections_are_redirected_and_attributed() -> anyhow::Result<()> {
    if !privileged::can_run("ipv6") {
        return Ok(());
    }
    let t = OnePod::start(|_, _| Ok(()))?;
    let cgroup_id = id_of(&t.container);

    let mut curl = t.curl("http://[fd00:ec2::254]/latest/meta-data/")?;
    curl.arg("-g");
    assert_eq!(run(curl).await?, format!("agent cgroup={}", cgroup_id.0));
    // A dual-stack IPv6 socket reaching the IPv4 endpoint through its mapped form.
    let mut mapped = t.command(SIM_CLIENT)?;
    mapped.args(["http", "[::ffff:169.254.169.254]:80"]);
    assert_eq!(run(mapped).await?, format!("agent cgroup={}", cgroup_id.0));

    let calls = t.lab.agent_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].exchange.local,
        SocketAddr::V6(t.lab.config.agent_v6.unwrap())
    );
    assert_eq!(calls[0].exchange.peer.ip(), t.pod.network().ip6);
    assert_eq!(calls[1].exchange.local, SocketAddr::V4(t.lab.config.agent_v4));
    for call in &calls {
        assert_eq!(call.attribution.expect("attributed").cgroup_id, cgroup_id);
    }
    assert_eq!(
        calls[0].attribution.unwrap().original_dst,
        "[fd00:ec2::254]:80".parse::<SocketAddr>()?
    );
    assert_eq!(t.lab.stand_in.tcp_accepted(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_agent_ipv6_address_ipv6_callers_reach_its_ipv4_mapped_address() -> anyhow::Result<()> {
    if !privileged::can_run("ipv6-fallback") {
        return Ok(());
    }
    let t = OnePod::start(|config, _| {
        config.agent_v6 = None;
        Ok(())
    })?;

    let mut client = t.command(SIM_CLIENT)?;
    client.args(["http", "[fd00:ec2::254]:80"]);
    assert_eq!(
        run(client).await?,
        format!("agent cgroup={}", id_of(&t.container).0)
    );
    assert_eq!(
        t.lab.agent_calls()[0].exchange.local,
        SocketAddr::V4(t.lab.config.agent_v4)
    );
    assert_eq!(t.lab.counter(Counter::MappedFallback), 1);
    assert_eq!(t.lab.stand_in.tcp_accepted(), 0);
    Ok(())
}
