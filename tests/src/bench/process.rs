//! What a process has used, from `/proc/<pid>`: resident memory now and at its peak, CPU time, and
//! open file descriptors.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now, in KiB.
    pub rss_kib: u64,
    /// `VmHWM`: the most it was ever resident, in KiB.
    pub peak_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(&status).with_context(|| format!("no VmRSS and VmHWM in {path}"))
    }

    /// Sets `pid`'s `VmHWM` back to its `VmRSS` (proc(5), `clear_refs` value 5), so the next reading's
    /// peak is the peak since now: the agent's start (parsing the kernel's BTF to load its programs)
    /// otherwise outweighs anything it does later.
    pub fn reset_peak(pid: u32) -> Result<()> {
        let path = format!("/proc/{pid}/clear_refs");
        std::fs::write(&path, "5").with_context(|| format!("cannot write {path}"))
    }

    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        };
        Some(Self {
            rss_kib: field("VmRSS")?,
            peak_kib: field("VmHWM")?,
        })
    }
}

/// CPU time `pid` has used so far, in user and kernel mode together (`utime` + `stime`).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("no utime and stime in {path}"))?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).context("no clock tick rate")?;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The file descriptors `pid` has open now: sockets, BPF objects, files.
pub fn open_fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    Ok(entries.count() as u64)
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks: the 14th and 15th fields, counted after
/// the command name, which may itself hold spaces and parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_user_and_kernel_ticks_after_the_command_name() {
        let stat = "4242 (tokio (x) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 3 0 1000";
        assert_eq!(cpu_ticks(stat), Some(325));
    }

    #[test]
    fn reads_resident_and_peak_from_proc_status() {
        let status = "Name:\tinterceptor\nVmPeak:\t  900000 kB\nVmHWM:\t   34816 kB\nVmRSS:\t   20172 kB\n";
        assert_eq!(
            Memory::parse(status),
            Some(Memory {
                rss_kib: 20172,
                peak_kib: 34816
            })
        );
    }
}
