//! Pieces of `cargo xtask bench` (its driver is `src/bin/bench.rs`): the agent with its log in a file,
//! nginx as the fixed-reply ceiling, wrk as the load, the kernel's run-time statistics of BPF programs,
//! connect() with the programs attached and detached, a process's memory and CPU time, the summary of
//! repeated runs, a quiet pod's latency while another floods the agent, and the soak.

pub mod agent;
pub mod bpf_stats;
pub mod connect;
pub mod flood;
pub mod nginx;
pub mod process;
pub mod soak;
pub mod spread;
pub mod wrk;

use std::path::Path;

use anyhow::{Context, Result};

use self::{spread::Spread, wrk::LoadResult};
use crate::sim::Pod;

/// The URL a load's clients ask, and the pod and cgroup they run in.
pub struct Route<'a> {
    pub url: String,
    pub pod: &'a Pod,
    pub cgroup: &'a Path,
}

/// What `sim-client` prints as `name=<value>` among the fields of its output.
pub fn output_value<'a>(output: &'a str, name: &str) -> Result<&'a str> {
    output
        .split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .with_context(|| format!("no {name} in {output:?}"))
}

/// The number `sim-client` prints as `name=<number>` among the fields of its output.
pub fn output_field(output: &str, name: &str) -> Result<f64> {
    output_value(output, name)?
        .parse()
        .with_context(|| format!("{name} in {output:?}"))
}

/// A latency in µs as the tables show it: µs below a millisecond, ms from there.
pub fn micros(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2}ms", value / 1000.0)
    } else {
        format!("{value:.0}us")
    }
}

/// Requests/s in thousands, as the tables show them.
fn thousands(value: f64) -> String {
    format!("{:.1}k", value / 1000.0)
}

/// A row of a load table: its name, the figure it reads from each run, and how it shows.
#[derive(Clone, Copy)]
pub struct Measure {
    pub name: &'static str,
    pub of: fn(&LoadResult) -> f64,
    pub show: fn(f64) -> String,
}

impl Measure {
    pub const REQUESTS_PER_SEC: Self = Self {
        name: "req/s",
        of: |r| r.requests_per_sec,
        show: thousands,
    };
    pub const P50: Self = Self {
        name: "p50",
        of: |r| r.p50_us,
        show: micros,
    };
    pub const P99: Self = Self {
        name: "p99",
        of: |r| r.p99_us,
        show: micros,
    };

    /// A cell of the table: the median of the runs, then their min and max.
    pub fn cell(&self, spread: Spread) -> String {
        let show = self.show;
        format!(
            "{} [{}-{}]",
            show(spread.median),
            show(spread.min),
            show(spread.max)
        )
    }
}
