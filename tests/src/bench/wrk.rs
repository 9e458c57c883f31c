//! wrk (Debian's package) as the load generator: one thread and a number of connections for a fixed
//! time, run in a pod's network namespace and a cgroup the caller chooses, its report read back as
//! numbers. With a new connection per request, wrk's latencies start when the request is written, after
//! the connect: the connection's cost shows in requests/s, not in p50 and p99. A counted load runs
//! `wrk.lua`, which counts the responses by status and can ask as an SDK does, at a set pace.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::{
    lab::{run, run_within},
    sim::Pod,
};

/// The script of counted loads; its header says what its arguments ask.
const SCRIPT: &str = include_str!("wrk.lua");

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connections {
    /// Every connection carries request after request.
    KeepAlive,
    /// `Connection: close` on every request: the server closes, and wrk connects again.
    NewPerRequest,
}

impl Connections {
    pub fn label(self) -> &'static str {
        match self {
            Connections::KeepAlive => "keep-alive",
            Connections::NewPerRequest => "new connection",
        }
    }
}

/// One run of wrk.
#[derive(Clone, Copy, Debug)]
pub struct Load<'a> {
    pub url: &'a str,
    pub clients: usize,
    pub connections: Connections,
    pub duration: Duration,
}

impl Load<'_> {
    /// wrk with this load, in `pod`'s network and `cgroup`.
    pub fn command(&self, pod: &Pod, cgroup: &Path) -> Result<Command> {
        let mut command = self.options(pod, cgroup)?;
        command.arg(self.url);
        Ok(command)
    }

    /// wrk with this load's options and no URL yet, which must come after any other option.
    fn options(&self, pod: &Pod, cgroup: &Path) -> Result<Command> {
        let mut command = pod.command(cgroup, "wrk")?;
        command
            .args(["--threads", "1", "--latency"])
            .args(["--connections", &self.clients.to_string()])
            .args(["--duration", &format!("{}s", self.duration.as_secs().max(1))]);
        if self.connections == Connections::NewPerRequest {
            command.args(["--header", "Connection: close"]);
        }
        Ok(command)
    }

    /// Runs wrk to the end and reads its report; fails when any response was not a success.
    pub async fn run(&self, pod: &Pod, cgroup: &Path) -> Result<LoadResult> {
        let report = run(self.command(pod, cgroup)?).await?;
        let result =
            LoadResult::parse(&report).with_context(|| format!("cannot read wrk's report:\n{report}"))?;
        ensure!(
            result.requests > 0 && result.non_success == 0,
            "{} of {} responses from {} were not successes:\n{report}",
            result.non_success,
            result.requests,
            self.url
        );
        Ok(result)
    }

    /// Runs wrk to the end with `requests` asked through the counting script, and reads its report and
    /// the responses by status. Unlike [`Load::run`], refusals do not fail it: they are counted.
    pub async fn run_counting(&self, pod: &Pod, cgroup: &Path, requests: Requests) -> Result<CountedLoad> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("wrk.lua");
        std::fs::write(&script, SCRIPT).with_context(|| format!("cannot write {}", script.display()))?;
        let mut command = self.options(pod, cgroup)?;
        command
            .arg("--script")
            .arg(&script)
            .arg(self.url)
            .arg("--")
            .args(requests.script_args());
        // wrk stops at its duration; the margin covers its start and its last responses.
        let report = run_within(command, self.duration + Duration::from_secs(30)).await?;
        let result =
            LoadResult::parse(&report).with_context(|| format!("cannot read wrk's report:\n{report}"))?;
        let statuses = Statuses::parse(&report)
            .with_context(|| format!("cannot read the statuses counted:\n{report}"))?;
        Ok(CountedLoad { result, statuses })
    }
}

/// What each connection of a counted load asks: the arguments of `wrk.lua`.
#[derive(Clone, Copy, Debug)]
pub enum Requests {
    /// The load's URL, as fast as the server answers.
    Url,
    /// What an SDK asks for the credentials of the load's URL (a role's): the role list and the role's
    /// credentials in turn, with an IMDSv2 token first (and anew every 100 requests) when `token`;
    /// each connection pauses `pause` after a response before its next request.
    Sdk { token: bool, pause: Duration },
}

impl Requests {
    fn script_args(self) -> Vec<String> {
        match self {
            Requests::Url => vec!["url".to_owned()],
            Requests::Sdk { token, pause } => vec![
                "sdk".to_owned(),
                pause.as_millis().to_string(),
                if token { "v2" } else { "v1" }.to_owned(),
            ],
        }
    }
}

/// A counted load's report: wrk's figures and the responses by status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CountedLoad {
    pub result: LoadResult,
    pub statuses: Statuses,
}

/// Responses by HTTP status.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Statuses(BTreeMap<u16, u64>);

impl Statuses {
    /// Responses with `status`.
    pub fn of(&self, status: u16) -> u64 {
        self.0.get(&status).copied().unwrap_or(0)
    }

    /// Responses of any status but 200.
    pub fn not_ok(&self) -> u64 {
        self.total() - self.of(200)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Statuses) {
        for (status, count) in &other.0 {
            *self.0.entry(*status).or_default() += count;
        }
    }

    /// The `status <code> <count>` lines of the script's `done()`, a code on several lines (one per
    /// wrk thread) summed.
    fn parse(report: &str) -> Option<Self> {
        let mut statuses = Self::default();
        for line in report.lines() {
            let Some(fields) = line.strip_prefix("status ") else {
                continue;
            };
            let (status, count) = fields.trim().split_once(' ')?;
            *statuses.0.entry(status.parse().ok()?).or_default() += count.trim().parse::<u64>().ok()?;
        }
        Some(statuses)
    }
}

/// What one wrk run reported.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Responses other than 2xx and 3xx.
    pub non_success: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
}

impl LoadResult {
    fn parse(report: &str) -> Option<Self> {
        let line_after = |prefix: &str| {
            report
                .lines()
                .find_map(|line| line.trim().strip_prefix(prefix).map(str::trim))
        };
        let requests = report.lines().find_map(|line| {
            let (count, rest) = line.trim().split_once(' ')?;
            rest.starts_with("requests in ").then(|| count.parse().ok())?
        })?;
        let socket_errors = line_after("Socket errors:").map_or(Some(0), |errors| {
            errors
                .split(',')
                .map(|field| field.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })?;
        Some(Self {
            requests,
            requests_per_sec: line_after("Requests/sec:")?.parse().ok()?,
            p50_us: micros(line_after("50%")?)?,
            p99_us: micros(line_after("99%")?)?,
            non_success: line_after("Non-2xx or 3xx responses:").map_or(Some(0), |n| n.parse().ok())?,
            socket_errors,
        })
    }
}

/// A wrk duration (`812.00us`, `1.23ms`, `2.00s`, `1.50m`) in microseconds.
fn micros(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 5s test @ http://10.99.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   135.65us   40.12us   2.10ms   90.00%
    Req/Sec   112.34k     3.21k  118.00k    70.00%
  Latency Distribution
     50%  120.00us
     75%  140.00us
     90%  180.00us
     99%    1.02ms
  562345 requests in 5.00s, 450.12MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec: 112469.00
Transfer/sec:     90.02MB
";

    #[test]
    fn reads_rate_percentiles_and_errors_from_the_report() {
        assert_eq!(
            LoadResult::parse(REPORT),
            Some(LoadResult {
                requests: 562_345,
                requests_per_sec: 112_469.0,
                p50_us: 120.0,
                p99_us: 1020.0,
                non_success: 3,
                socket_errors: 3,
            })
        );
    }

    #[test]
    fn a_clean_report_has_no_error_lines() {
        let clean: String = REPORT
            .lines()
            .filter(|line| !line.contains("Non-2xx") && !line.contains("Socket errors"))
            .map(|line| format!("{line}\n"))
            .collect();
        let result = LoadResult::parse(&clean).expect("parses");
        assert_eq!((result.non_success, result.socket_errors), (0, 0));
    }

    #[test]
    fn sums_the_statuses_the_script_counted_per_thread() {
        let report = format!("{REPORT}status 200 562342\nstatus 429 2\nstatus 429 1\n");
        let statuses = Statuses::parse(&report).expect("parses");
        assert_eq!(
            (statuses.of(200), statuses.of(429), statuses.not_ok()),
            (562_342, 3, 3)
        );
        assert_eq!(Statuses::parse(REPORT), Some(Statuses::default()));
    }

    #[test]
    fn reads_every_unit_wrk_prints() {
        assert_eq!(micros("812.00us"), Some(812.0));
        assert_eq!(micros("1.50ms"), Some(1500.0));
        assert_eq!(micros("2.00s"), Some(2e6));
        assert_eq!(micros("12.3xs"), None);
    }
}
