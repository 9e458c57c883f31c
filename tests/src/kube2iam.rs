//! kube2iam on a simulated node, as a node has it before the switch to interceptor: its DNAT rule
//! (real iptables in the node's network namespace, as its chart renders `--iptables --host-interface
//! cali+`: pods' packets to 169.254.169.254:80 entering through their interfaces go to
//! `HOST_IP:<port>`), and a stand-in for its agent on that port, answering every pod with one role and
//! credentials marked as kube2iam's (kube2iam picks them by the caller's IP), and every other path as
//! proxied. Its chart's preStop command removes every NAT rule that mentions 169.254.169.254.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{
    lab::run,
    responder::Responder,
    sim::{METADATA_IP, NODE_IP, POD_INTERFACE_PREFIX, SimNode},
};

/// kube2iam's chart's default `lifecycle.preStop` command, run by `/bin/sh -c` in its pod.
pub const PRE_STOP: &str = "eval `iptables-save | grep 169.254.169.254 | sed s/-A/'iptables -t nat -D'/g`";

pub struct Kube2iam {
    _agent: Responder,
}

impl Kube2iam {
    /// The role kube2iam gives the pods in this simulation.
    pub const ROLE: &str = "kube2iam-role";
    /// What marks its credentials, to look for in what a pod received.
    pub const CREDENTIALS: &str = "KUBE2IAM-CREDENTIALS";

    /// Starts kube2iam's agent on `NODE_IP:port` and adds its DNAT rule.
    pub async fn install(node: &SimNode, port: u16) -> Result<Self> {
        let agent = Responder::spawn(node.bind_tcp((NODE_IP, port).into())?, |exchange| match exchange
            .path
            .as_str()
        {
            "/latest/meta-data/iam/security-credentials/" => Self::ROLE.to_owned(),
            path if path.contains("security-credentials/") => Self::CREDENTIALS.to_owned(),
            path => format!("kube2iam proxied {path}"),
        });
        let mut dnat = iptables(node)?;
        dnat.args(["-t", "nat", "-A", "PREROUTING", "-p", "tcp"])
            .args(["-d", &format!("{METADATA_IP}/32"), "--dport", "80"])
            .args(["-i", &format!("{POD_INTERFACE_PREFIX}+")])
            .args(["-j", "DNAT", "--to-destination", &format!("{NODE_IP}:{port}")]);
        run(dnat).await.context("cannot add kube2iam's DNAT rule")?;
        Ok(Self { _agent: agent })
    }

    /// What kube2iam's pod runs when it stops (its chart's preStop); its agent stops with `self`.
    pub async fn pre_stop(node: &SimNode) -> Result<()> {
        let mut command = node.command(&node.cgroup("system.slice/kube2iam.service")?, "sh")?;
        command.args(["-c", PRE_STOP]);
        run(command).await.context("kube2iam's preStop failed").map(drop)
    }
}

/// The NAT rules of the node that mention the metadata address, as `iptables -t nat -S` prints them.
pub async fn metadata_nat_rules(node: &SimNode) -> Result<Vec<String>> {
    let mut list = iptables(node)?;
    list.args(["-t", "nat", "-S", "PREROUTING"]);
    Ok(run(list)
        .await?
        .lines()
        .filter(|rule| rule.contains(&METADATA_IP.to_string()))
        .map(str::to_owned)
        .collect())
}

/// `iptables` in the node's network namespace, as a node service.
fn iptables(node: &SimNode) -> Result<Command> {
    node.command(&node.cgroup("system.slice/kube2iam.service")?, "iptables")
}
