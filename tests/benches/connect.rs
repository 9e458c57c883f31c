//! Cost of the programs for connections they do not redirect: `connect()` to a loopback listener inside
//! a simulated pod, with the programs detached and attached, alternating in one run. Reported as the
//! ratio attached / detached of the medians, so machine speed cancels out.

use std::time::Duration;

use anyhow::{Context, Result};
use interceptor::bpf::Interceptor;
use interceptor_tests::{
    lab::run,
    privileged,
    sim::{Pod, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");
// Odd, so the median is one of the rounds.
const ROUNDS: usize = 7;
const CONNECTS_PER_ROUND: usize = 2000;

#[tokio::main]
async fn main() -> Result<()> {
    if !privileged::can_run("connect benchmark") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let pod = node.pod()?;
    let container = pod.container()?;
    // Every connect leaves a socket in TIME_WAIT; without reuse, connects slow down past ~14k of them.
    let mut sysctl = pod.command(&container, "sysctl")?;
    sysctl.args(["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    run(sysctl).await?;

    let (mut detached, mut attached) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // The second measurement of a round runs slower (sockets left from the first), so the order
        // alternates between rounds.
        if round % 2 == 0 {
            detached.push(median_connect(&pod, &container).await?);
        }
        let interceptor = Interceptor::attach(&node.redirect_config())?;
        attached.push(median_connect(&pod, &container).await?);
        drop(interceptor);
        if round % 2 == 1 {
            detached.push(median_connect(&pod, &container).await?);
        }
    }
    let (detached, attached) = (median(detached), median(attached));
    println!(
        "connect() to an unrelated loopback listener in a pod, median of {ROUNDS} rounds x {CONNECTS_PER_ROUND}:"
    );
    println!("  programs detached: {:>8.1} us", as_micros(detached));
    println!("  programs attached: {:>8.1} us", as_micros(attached));
    println!(
        "  ratio attached / detached: {:.3}",
        attached.as_secs_f64() / detached.as_secs_f64()
    );
    Ok(())
}

async fn median_connect(pod: &Pod, container: &std::path::Path) -> Result<Duration> {
    let mut client = pod.command(container, SIM_CLIENT)?;
    client.args(["connect-loop", "--count", &CONNECTS_PER_ROUND.to_string()]);
    let output = run(client).await?;
    let median = output
        .split_whitespace()
        .find_map(|field| field.strip_prefix("median_ns="))
        .with_context(|| format!("no median in {output:?}"))?;
    Ok(Duration::from_nanos(median.parse()?))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

fn as_micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
