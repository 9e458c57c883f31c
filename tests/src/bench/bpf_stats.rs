//! The kernel's run-time statistics of BPF programs: while [`StatsEnabled`] lives the kernel counts the
//! runs and the time of every program (what `kernel.bpf_stats_enabled=1` does, through the
//! BPF_ENABLE_STATS command instead of the sysctl: it turns itself off when its descriptor closes, even
//! if the bench dies). Read per program a process holds, before and after a measured interval.

use std::{collections::BTreeSet, os::fd::OwnedFd};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

/// Statistics are counted while this lives.
pub struct StatsEnabled {
    _fd: OwnedFd,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(Self { _fd: fd })
    }
}

/// One program's counts so far (or over an interval, from [`ProgramStats::since`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProgramStats {
    pub id: u32,
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramStats {
    /// Every program `pid` holds a descriptor of, directly or through a link.
    pub fn of_process(pid: u32) -> Result<Vec<Self>> {
        let ids = program_ids_of(pid)?;
        ensure!(!ids.is_empty(), "process {pid} holds no BPF program");
        let mut found = Vec::new();
        // Programs of other processes may be unloaded while this iterates; only ours must be found.
        for info in aya::programs::loaded_programs().flatten() {
            if ids.contains(&info.id()) {
                found.push(Self {
                    id: info.id(),
                    name: info.name_as_str().unwrap_or("?").to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                });
            }
        }
        ensure!(
            found.len() == ids.len(),
            "found {} of the {} programs of process {pid}",
            found.len(),
            ids.len()
        );
        Ok(found)
    }

    /// The counts between `before` and `after` (two readings of the same programs).
    pub fn since(after: &[Self], before: &[Self]) -> Vec<Self> {
        after
            .iter()
            .map(|now| {
                let then = before.iter().find(|then| then.id == now.id);
                Self {
                    run_count: now.run_count - then.map_or(0, |then| then.run_count),
                    run_time_ns: now.run_time_ns - then.map_or(0, |then| then.run_time_ns),
                    ..now.clone()
                }
            })
            .collect()
    }

    /// Mean time of one run, in ns (0 when it never ran).
    pub fn ns_per_run(&self) -> f64 {
        if self.run_count == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_count as f64
        }
    }
}

/// The ids of the programs behind `pid`'s descriptors: program and link descriptors both show
/// `prog_id:` in their fdinfo.
fn program_ids_of(pid: u32) -> Result<BTreeSet<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        // A descriptor closed while this reads is simply not counted.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(info.lines().find_map(|line| {
            line.strip_prefix("prog_id:")
                .and_then(|id| id.trim().parse::<u32>().ok())
        }));
    }
    Ok(ids)
}
