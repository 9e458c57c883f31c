//! What the programs cost connections they do not redirect: `connect()` from a simulated pod to a
//! listener in the node's network namespace that runs outside the workload cgroups (as a pod connecting
//! to anything but the metadata service does), with the programs detached and attached, alternating in
//! one run, on a node of its own. Only the pod's end of each connection runs the programs, so this is
//! what a pod pays, not twice that. Reported as the ratio attached / detached of the medians, so
//! machine speed cancels out.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use interceptor::bpf::Interceptor;
use serde::Serialize;
use tokio::task::JoinHandle;

use super::{output_field, spread::Spread};
use crate::{
    lab::run,
    sim::{NODE_IP, SimNode},
};

/// A listener on the node's address that accepts every connection and closes it at once. It runs in
/// this process, whose cgroup is outside the node's kubepods: the accepting side runs none of the
/// programs (no sock_ops callbacks, no egress filter, no getpeername hook on accept), so a connection
/// to it costs only what the connecting pod's side costs. Stops accepting on drop.
pub struct UnrelatedListener {
    addr: SocketAddr,
    accepting: JoinHandle<()>,
}

impl UnrelatedListener {
    /// Listens on a free port of the node's address; must run inside a tokio runtime.
    pub fn start(node: &SimNode) -> Result<Self> {
        let listener = node.bind_tcp(SocketAddr::from((NODE_IP, 0)))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener =
            tokio::net::TcpListener::from_std(listener).context("cannot register the listener with tokio")?;
        let accepting = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        Ok(Self { addr, accepting })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UnrelatedListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct ConnectCost {
    pub rounds: usize,
    pub connects_per_round: usize,
    /// Median over rounds of each round's median connect(), in µs.
    pub detached_us: f64,
    pub attached_us: f64,
}

impl ConnectCost {
    pub fn ratio(&self) -> f64 {
        self.attached_us / self.detached_us
    }
}

/// `rounds` (odd, so the median is one of them) rounds of `connects` connects each way from a pod to an
/// [`UnrelatedListener`], timed by `sim_client connect-loop`.
pub async fn attached_vs_detached(sim_client: &Path, rounds: usize, connects: usize) -> Result<ConnectCost> {
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    let listener = UnrelatedListener::start(&node)?;
    // Every connect leaves a socket in TIME_WAIT; without reuse, connects slow down past ~14k of them.
    let mut sysctl = pod.command(&container, "sysctl")?;
    sysctl.args(["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    run(sysctl).await?;

    // The median connect() of one round, in µs.
    let time = async || -> Result<f64> {
        let mut client = pod.command(&container, sim_client)?;
        client
            .args(["connect-loop", "--to", &listener.addr().to_string()])
            .args(["--count", &connects.to_string()]);
        let output = run(client).await?;
        Ok(output_field(&output, "median_ns")? / 1000.0)
    };
    let (mut detached, mut attached) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The second measurement of a round runs slower (sockets left from the first), so the order
        // alternates between rounds.
        if round % 2 == 0 {
            detached.push(time().await?);
        }
        let interceptor = Interceptor::attach(&node.redirect_config())?;
        attached.push(time().await?);
        drop(interceptor);
        if round % 2 == 1 {
            detached.push(time().await?);
        }
    }
    Ok(ConnectCost {
        rounds,
        connects_per_round: connects,
        detached_us: Spread::of(&detached).median,
        attached_us: Spread::of(&attached).median,
    })
}
