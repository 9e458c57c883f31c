//! The soak: the agent under a steady mix of callers for minutes, its resident memory (VmRSS), its open
//! file descriptors and the requests it has answered sampled every [`SAMPLE_EVERY`]. After a warm-up
//! (a third of the soak, at least a minute), the least-squares slope of memory and of descriptors
//! against time says whether they stay flat: flat when the slope's upper bound (slope + 2 standard
//! errors) is under the threshold, so a flat verdict is one the samples show, not one their noise
//! allows. Every response of the mix other than 200, and every failed connection, is counted.
//!
//! The mix is a node's in kind, not in rate: [`pods_needed`] pods with a role each, asking as SDKs and
//! scripts do (keep-alive, a new connection per request, IMDSv2 with a token), each connection pausing
//! [`PAUSE`] between requests (wrk's `delay()`, through `wrk.lua`; Debian's wrk has no rate option).
//! About 700 requests/s: a few percent of what the agent answers flat out, so the machine stays far
//! from saturation and the figures are the agent's steady state, yet a leak of one byte per request
//! grows by more than 2 MiB an hour and stands out within minutes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::json;

use super::{
    Route,
    process::{Memory, open_fds},
    spread::Spread,
    wrk::{Connections, CountedLoad, Load, Requests, Statuses},
};
use crate::{deployed::health, exposition::Samples, sim::SimNode};

/// How one pod of the mix asks: one wrk with `clients` connections.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pattern {
    connections: Connections,
    clients: usize,
    /// IMDSv2: a token first (and a new one every 100 requests), sent with every request.
    token: bool,
}

/// The mix: how many pods ask each way.
const MIX: [(usize, Pattern); 3] = [
    // SDKs that keep their connection, on IMDSv1.
    (
        4,
        Pattern {
            connections: Connections::KeepAlive,
            clients: 2,
            token: false,
        },
    ),
    // Scripts and short-lived processes: a new connection for every request.
    (
        3,
        Pattern {
            connections: Connections::NewPerRequest,
            clients: 1,
            token: false,
        },
    ),
    // SDKs on IMDSv2.
    (
        3,
        Pattern {
            connections: Connections::KeepAlive,
            clients: 1,
            token: true,
        },
    ),
];

/// Each connection's pause after a response: about 50 requests/s per connection, 700 over the mix's 14.
const PAUSE: Duration = Duration::from_millis(20);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Counts of the descriptors per sample, and the time between them; see [`steady_open_fds`].
const FD_COUNTS: usize = 5;
const FD_COUNT_GAP: Duration = Duration::from_millis(100);
/// The shortest warm-up; see [`warm_up`].
const MIN_WARM_UP: Duration = Duration::from_secs(60);
/// The mix runs this much longer than the soak, so the last sample is taken under load.
const LOAD_TAIL: Duration = Duration::from_secs(5);

/// VmRSS may grow this fast and still be flat: the chart gives the agent 128 MiB and it holds about
/// 26 MiB under this load, so at this rate the other ~100 MiB last 30 days (100 MiB / 720 h is 142
/// KiB/h), the longest a node commonly lives (Karpenter's default expiry) and so the agent without a
/// restart.
const RSS_THRESHOLD_KIB_PER_HOUR: f64 = 128.0;
/// Open descriptors may grow this fast and still be flat: one an hour. A descriptor leak is a bug at any
/// rate (a socket or a file the agent forgot); with the count steadied (see [`steady_open_fds`]) a
/// flat count fits a slope of 0 with no error, and a real leak stands out within minutes.
const FDS_THRESHOLD_PER_HOUR: f64 = 1.0;

/// Samples before this are left out of the slopes: the first sessions from STS, the allocator's arenas
/// and the runtime's buffers growing to what the load needs. A third of the soak: the longer the soak,
/// the slower the growth its slope must tell from that settling.
fn warm_up(length: Duration) -> Duration {
    (length / 3).max(MIN_WARM_UP)
}

/// Pods [`soak`] needs, each with a role of its own.
pub fn pods_needed() -> usize {
    MIX.iter().map(|(pods, _)| pods).sum()
}

/// One reading of the agent.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Since the mix started.
    pub seconds: f64,
    pub rss_kib: u64,
    pub open_fds: u64,
    /// Metadata requests answered since the agent started (its metrics), and of them those with a
    /// status other than 200.
    pub answered: u64,
    pub answered_not_ok: u64,
}

impl Sample {
    async fn take(node: &SimNode, pid: u32, seconds: f64) -> Result<Self> {
        let rss_kib = Memory::of(pid)?.rss_kib;
        let open_fds = steady_open_fds(pid).await?;
        // After the descriptors are counted: the scrape's own connection is not among them.
        let (status, exposition) = health(node, "/metrics").await?;
        ensure!(status == 200, "the agent's /metrics answered {status}");
        let by_status =
            Samples::parse(&exposition)?.sum_by_label("interceptor_metadata_requests_total", "status");
        let answered = by_status.values().sum::<f64>() as u64;
        let answered_ok = by_status.get("200").copied().unwrap_or(0.0) as u64;
        Ok(Self {
            seconds,
            rss_kib,
            open_fds,
            answered,
            answered_not_ok: answered - answered_ok,
        })
    }
}

/// The median of [`FD_COUNTS`] counts of `pid`'s descriptors [`FD_COUNT_GAP`] apart: a connection
/// opening or closing at the instant of one count (a new-connection client's, the Kubernetes watch
/// reconnecting) does not move it, a descriptor that stays does.
async fn steady_open_fds(pid: u32) -> Result<u64> {
    let mut counts = Vec::with_capacity(FD_COUNTS);
    for index in 0..FD_COUNTS {
        if index > 0 {
            tokio::time::sleep(FD_COUNT_GAP).await;
        }
        counts.push(open_fds(pid)? as f64);
    }
    Ok(Spread::of(&counts).median as u64)
}

/// The least-squares line through some points: its slope and the slope's standard error.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fit {
    slope: f64,
    stderr: f64,
}

impl Fit {
    /// At least three points, not all at one x.
    fn of(points: &[(f64, f64)]) -> Self {
        assert!(points.len() >= 3, "a slope and its error need three points");
        let n = points.len() as f64;
        let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
        let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
        let sxy: f64 = points.iter().map(|(x, y)| (x - mean_x) * (y - mean_y)).sum();
        let slope = sxy / sxx;
        let residuals: f64 = points
            .iter()
            .map(|(x, y)| (y - mean_y - slope * (x - mean_x)).powi(2))
            .sum();
        Self {
            slope,
            stderr: (residuals / (n - 2.0) / sxx).sqrt(),
        }
    }
}

/// Whether a series grew no faster than its threshold: flat when the slope plus two standard errors is
/// at most the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Flat,
    NotFlat,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Flat => "flat",
            Verdict::NotFlat => "NOT FLAT",
        }
    }
}

/// One series of the samples (VmRSS or descriptors): first, last, min and max of all samples, and the
/// slope fitted to those after the warm-up, against its threshold.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Trend {
    pub first: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    pub slope_per_hour: f64,
    pub slope_stderr_per_hour: f64,
    pub threshold_per_hour: f64,
    pub verdict: Verdict,
}

impl Trend {
    fn of(samples: &[Sample], warm_up: Duration, value: fn(&Sample) -> u64, threshold_per_hour: f64) -> Self {
        let values: Vec<f64> = samples.iter().map(|sample| value(sample) as f64).collect();
        let after_warm_up: Vec<(f64, f64)> = samples_after(samples, warm_up)
            .map(|sample| (sample.seconds, value(sample) as f64))
            .collect();
        let fit = Fit::of(&after_warm_up);
        let (slope_per_hour, slope_stderr_per_hour) = (fit.slope * 3600.0, fit.stderr * 3600.0);
        let spread = Spread::of(&values);
        Self {
            first: values[0],
            last: values[values.len() - 1],
            min: spread.min,
            max: spread.max,
            slope_per_hour,
            slope_stderr_per_hour,
            threshold_per_hour,
            verdict: if slope_per_hour + 2.0 * slope_stderr_per_hour <= threshold_per_hour {
                Verdict::Flat
            } else {
                Verdict::NotFlat
            },
        }
    }
}

/// What the soak measured.
pub struct SoakReport {
    length: Duration,
    warm_up: Duration,
    samples: Vec<Sample>,
    rss: Trend,
    fds: Trend,
    /// Each pod's pattern and what its wrk counted.
    loads: Vec<(Pattern, CountedLoad)>,
}

/// Runs the mix from `pods` (at least [`pods_needed`], each asking for its role's credentials at its
/// URL) for `length`, sampling the agent `pid` on `node` meanwhile.
pub async fn soak(node: &SimNode, pid: u32, pods: &[Route<'_>], length: Duration) -> Result<SoakReport> {
    ensure!(
        pods.len() >= pods_needed(),
        "the soak's mix needs {} pods, not {}",
        pods_needed(),
        pods.len()
    );
    let patterns = MIX
        .iter()
        .flat_map(|&(pods, pattern)| std::iter::repeat_n(pattern, pods));
    let loads = patterns.zip(pods).map(|(pattern, pod)| async move {
        let load = Load {
            url: &pod.url,
            clients: pattern.clients,
            connections: pattern.connections,
            duration: length + LOAD_TAIL,
        };
        let requests = Requests::Sdk {
            token: pattern.token,
            pause: PAUSE,
        };
        let counted = load.run_counting(pod.pod, pod.cgroup, requests).await;
        counted.map(|counted| (pattern, counted))
    });
    let (loads, samples) = tokio::try_join!(
        futures::future::try_join_all(loads),
        sample_during(node, pid, length)
    )?;
    let warm_up = warm_up(length);
    let fitted = samples_after(&samples, warm_up).count();
    ensure!(fitted >= 3, "{fitted} samples after the warm-up: soak longer");
    Ok(SoakReport {
        length,
        warm_up,
        rss: Trend::of(
            &samples,
            warm_up,
            |sample| sample.rss_kib,
            RSS_THRESHOLD_KIB_PER_HOUR,
        ),
        fds: Trend::of(
            &samples,
            warm_up,
            |sample| sample.open_fds,
            FDS_THRESHOLD_PER_HOUR,
        ),
        samples,
        loads,
    })
}

fn samples_after(samples: &[Sample], warm_up: Duration) -> impl Iterator<Item = &Sample> {
    samples
        .iter()
        .filter(move |sample| sample.seconds >= warm_up.as_secs_f64())
}

/// Samples the agent every [`SAMPLE_EVERY`] from now until `length` has passed, both ends included.
async fn sample_during(node: &SimNode, pid: u32, length: Duration) -> Result<Vec<Sample>> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let count = length.as_secs() / SAMPLE_EVERY.as_secs() + 1;
    let mut samples = Vec::new();
    for _ in 0..count {
        ticks.tick().await;
        let sample = Sample::take(node, pid, started.elapsed().as_secs_f64())
            .await
            .context("cannot sample the agent")?;
        eprintln!(
            "soak: {:>5.0} s: VmRSS {} KiB, {} fds, {} requests answered ({} not 200)",
            sample.seconds, sample.rss_kib, sample.open_fds, sample.answered, sample.answered_not_ok
        );
        samples.push(sample);
    }
    Ok(samples)
}

impl SoakReport {
    /// The mix's responses by status, over all its pods.
    fn statuses(&self) -> Statuses {
        let mut statuses = Statuses::default();
        for (_, load) in &self.loads {
            statuses.add(&load.statuses);
        }
        statuses
    }

    fn failed_connections(&self) -> u64 {
        self.loads.iter().map(|(_, load)| load.result.socket_errors).sum()
    }

    /// Requests the agent answered per second over the samples.
    fn answered_per_sec(&self) -> f64 {
        let (first, last) = (&self.samples[0], &self.samples[self.samples.len() - 1]);
        (last.answered - first.answered) as f64 / (last.seconds - first.seconds)
    }

    pub fn print(&self) {
        let (first, last) = (&self.samples[0], &self.samples[self.samples.len() - 1]);
        println!(
            "\nsoak: {} pods, {} min, {:.0} requests/s answered ({} at the last sample); sampled every {} s, \
             slopes fitted to the {} samples after a {} s warm-up; flat: slope + 2 SE <= threshold",
            self.loads.len(),
            self.length.as_secs() / 60,
            self.answered_per_sec(),
            last.answered,
            SAMPLE_EVERY.as_secs(),
            samples_after(&self.samples, self.warm_up).count(),
            self.warm_up.as_secs()
        );
        println!(
            "{:<12} {:>8} {:>8} {:>8} {:>8} {:>22} {:>12}  verdict",
            "", "first", "last", "min", "max", "slope/h (+-2 SE)", "threshold/h"
        );
        for (name, trend) in [("VmRSS (KiB)", &self.rss), ("open fds", &self.fds)] {
            let slope = format!(
                "{:+.1} (+-{:.1})",
                trend.slope_per_hour,
                2.0 * trend.slope_stderr_per_hour
            );
            println!(
                "{name:<12} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {slope:>22} {:>12.0}  {}",
                trend.first,
                trend.last,
                trend.min,
                trend.max,
                trend.threshold_per_hour,
                trend.verdict.label()
            );
        }
        let statuses = self.statuses();
        println!(
            "errors: {} of the mix's {} responses not 200 {}, {} failed connections (wrk); the agent \
             answered {} requests not 200 during the soak",
            statuses.not_ok(),
            statuses.total(),
            serde_json::to_string(&statuses).unwrap_or_default(),
            self.failed_connections(),
            last.answered_not_ok - first.answered_not_ok
        );
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mix: Vec<serde_json::Value> = self
            .loads
            .iter()
            .map(|(pattern, load)| json!({ "pattern": pattern, "load": load }))
            .collect();
        json!({
            "minutes": self.length.as_secs() / 60,
            "sample_every_seconds": SAMPLE_EVERY.as_secs(),
            "warm_up_seconds": self.warm_up.as_secs(),
            "verdict_rule": "flat when slope + 2 standard errors <= threshold",
            "pause_ms": PAUSE.as_millis(),
            "answered_per_sec": self.answered_per_sec(),
            "rss_kib": self.rss,
            "open_fds": self.fds,
            "errors": {
                "statuses": self.statuses(),
                "failed_connections": self.failed_connections(),
            },
            "mix": mix,
            "samples": self.samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_slope_of_a_line_with_no_error() {
        let points: Vec<(f64, f64)> = (0..5).map(|x| (f64::from(x), 3.0 + 2.0 * f64::from(x))).collect();
        assert_eq!(
            Fit::of(&points),
            Fit {
                slope: 2.0,
                stderr: 0.0
            }
        );
    }

    #[test]
    fn the_slope_of_noise_around_a_level_is_small_beside_its_error() {
        let fit = Fit::of(&[(0.0, 10.0), (1.0, 12.0), (2.0, 10.0), (3.0, 12.0), (4.0, 10.0)]);
        assert_eq!(fit.slope, 0.0);
        assert!(fit.stderr > 0.0);
    }
}
