//! `sudo cargo xtask demo`: the agent's main job on this machine. A simulated node with two pods, a
//! static workload file mapping them to `demo-reader` and `demo-writer`, moto as STS, the real agent;
//! the AWS CLI in each pod asks STS who it is. Everything is removed on exit.

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use interceptor_tests::{
    agent::Agent,
    deployed::{DeployedNode, ROLE_LIST, Sts, aws_cli_caller_arn, body_of, curl, status_of},
    lab::run,
    privileged,
    sim::{Pod, SimNode},
};

#[tokio::main]
async fn main() -> ExitCode {
    if !privileged::can_run("demo") || !privileged::has_python_tools("demo") {
        return ExitCode::FAILURE;
    }
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<()> {
    let mut node = SimNode::new()?;
    let (reader, writer) = (node.pod()?, node.pod()?);
    let (reader_container, writer_container) = (reader.container()?, writer.container()?);
    let t = DeployedNode::start(
        node,
        &[(reader.slice(), "demo-reader"), (writer.slice(), "demo-writer")],
        Sts::Moto,
        // As an operator would run it: one info line per request.
        &["--log-level", "info"],
    )?;
    println!(
        "interceptor demo: one simulated node, two pods, moto as STS at {}, agent {}\n",
        t.moto().url(),
        Agent::binary()?.display()
    );
    println!("static workload file ({}):", t.workloads.path().display());
    let file = std::fs::read_to_string(t.workloads.path())?;
    for line in file.trim().lines() {
        println!("{}{line}", if line.is_empty() { "" } else { "  " });
    }
    println!();

    for (name, pod, container) in [
        ("demo-reader", &reader, &reader_container),
        ("demo-writer", &writer, &writer_container),
    ] {
        let arn = aws_cli_caller_arn(pod, container, &t.moto().url())
            .await
            .with_context(|| format!("the AWS CLI in the {name} pod"))?;
        println!("pod {} ({name}): aws sts get-caller-identity", pod.uid);
        println!("  -> {arn}");
    }

    let (median, p90) = cached_latency(&reader, &reader_container, 50).await?;
    println!(
        "\ncached credentials request, as curl in the demo-reader pod times it (50 requests): median {:.2} ms, p90 {:.2} ms",
        median.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3
    );

    let direct = format!(
        "http://{}/latest/meta-data/iam/security-credentials/",
        t.node.agent_v4()
    );
    let refused = match curl(&reader, &reader_container, &[&direct]).await {
        Ok(response) => format!("HTTP {}", status_of(&response)),
        Err(err) => format!("{:#}", err)
            .rsplit(": ")
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    println!("a connection straight to the agent from a pod ({direct}): {refused}");
    let user_data = curl(
        &reader,
        &reader_container,
        &["http://169.254.169.254/latest/user-data"],
    )
    .await?;
    println!("the node's user-data from a pod: HTTP {}", status_of(&user_data));
    println!("\ncleaning up: agent stopped, programs detached, namespaces and cgroups removed");
    Ok(())
}

/// Median and 90th percentile of `count` credential requests, each a new curl process and connection,
/// as curl measures them (`time_total`).
async fn cached_latency(pod: &Pod, container: &Path, count: usize) -> Result<(Duration, Duration)> {
    let role = body_of(&curl(pod, container, &[ROLE_LIST]).await?).to_owned();
    let url = format!("{ROLE_LIST}{role}");
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let mut command = pod.command(container, "curl")?;
        command.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
            "--noproxy",
            "*",
            &url,
        ]);
        let seconds: f64 = run(command).await?.parse().context("curl's time_total")?;
        times.push(Duration::from_secs_f64(seconds));
    }
    times.sort();
    Ok((times[count / 2], times[count * 9 / 10]))
}
