//! `sudo cargo xtask bench`: installs what the benchmarks run (nginx-light, wrk, iptables, moto in the
//! venv), builds the BPF object, a release agent and the bench driver, and runs the driver
//! (`tests/src/bin/bench.rs`): one table on standard output, the same figures as JSON under
//! `target/bench/`. With `--perf`, records the agent under load with perf instead; with `--soak`, runs
//! the soak instead (`soak-<time>.json`); with `--only flood`, that section alone (`flood-<time>.json`).

use std::{path::PathBuf, process::Command, time::SystemTime};

use anyhow::{Context, Result};

use crate::{
    build_ebpf::{self, workspace_cargo, workspace_root},
    install::{ensure_commands, run_checked},
    python,
    test::TEST_COMMANDS,
};

#[derive(clap::Args)]
pub struct Options {
    /// Runs of each measurement; the table shows their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of each load run (at most 50).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Instead of the benchmarks: record the agent with `perf record` while 16 keep-alive clients load
    /// it, into target/bench/perf.data (read it with `perf report -i target/bench/perf.data`).
    #[arg(long)]
    perf: bool,
    /// Measure this agent binary instead of a release build of the workspace's: an older build to
    /// compare with, or the static musl binary the image ships (`cargo xtask image --profile release`).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Run only this section: `flood`, a quiet pod alone and while another floods the agent.
    #[arg(long, value_parser = ["flood"], conflicts_with = "perf")]
    only: Option<String>,
    /// Instead of the benchmarks: a steady mix of callers for this many minutes (at least 2), the
    /// agent's memory and open descriptors sampled every 10 s; reports their slope and whether flat.
    #[arg(long, value_name = "MINUTES", conflicts_with_all = ["perf", "only"])]
    soak: Option<u64>,
}

/// Commands the benchmarks run, with the Debian packages that provide them.
const BENCH_COMMANDS: &[(&str, &str)] = &[
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("iptables", "iptables"),
    ("sysctl", "procps"),
];

pub fn run(options: &Options) -> Result<()> {
    ensure_commands(TEST_COMMANDS)?;
    ensure_commands(BENCH_COMMANDS)?;
    if options.perf {
        ensure_commands(&[("perf", "linux-perf")])?;
    }
    python::ensure_venv(python::TEST_TOOLS)?;
    build_ebpf::run()?;
    // The agent as it runs on a node, a release build; one cargo run for it and the driver, so both
    // share one resolution of the dependencies' features and build them once.
    run_checked(workspace_cargo().args([
        "build",
        "--release",
        "--package",
        "interceptor",
        "--package",
        "interceptor-tests",
        "--bin",
        "interceptor",
        "--bin",
        "bench",
        "--bin",
        "sim-client",
    ]))?;
    let release = workspace_root().join("target/release");
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let agent = match &options.agent {
        Some(path) => std::path::absolute(path).with_context(|| format!("bad --agent {}", path.display()))?,
        None => release.join("interceptor"),
    };
    let mut driver = Command::new(release.join("bench"));
    driver
        .env("INTERCEPTOR_AGENT_BIN", agent)
        .args(["--runs", &options.runs.to_string()])
        .args(["--seconds", &options.seconds.to_string()]);
    if options.perf {
        driver.arg("--perf-record").arg(out.join("perf.data"));
    }
    if let Some(section) = &options.only {
        driver.args(["--only", section]);
    }
    if let Some(minutes) = options.soak {
        driver.args(["--soak", &minutes.to_string()]);
    }
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let kind = match (&options.only, options.soak) {
        (_, Some(_)) => "soak",
        (Some(section), None) => section,
        (None, None) => "bench",
    };
    driver
        .arg("--json")
        .arg(out.join(format!("{kind}-{started}.json")));
    run_checked(&mut driver)
}
