//! Pieces of `cargo xtask bench` (its driver is `src/bin/bench.rs`): the agent with its log in a file,
//! nginx as the fixed-reply ceiling, wrk as the load, the kernel's run-time statistics of BPF programs,
//! connect() with the programs attached and detached, a process's memory and CPU time, and the summary
//! of repeated runs.

pub mod agent;
pub mod bpf_stats;
pub mod connect;
pub mod nginx;
pub mod process;
pub mod spread;
pub mod wrk;

use anyhow::{Context, Result};

/// The number `sim-client` prints as `name=<number>` among the fields of its output.
pub fn output_field(output: &str, name: &str) -> Result<f64> {
    output
        .split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .with_context(|| format!("no {name} in {output:?}"))?
        .parse()
        .with_context(|| format!("{name} in {output:?}"))
}
