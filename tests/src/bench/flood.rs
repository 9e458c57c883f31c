//! The flood row: how a quiet pod's cached-credentials requests fare while another pod floods the
//! agent. The quiet pod asks as an SDK does, the role list and the credentials in turn, one client
//! pausing [`QUIET_PAUSE`] between requests: within the agent's default per-pod rate, so that the row
//! measures the flood, not the quiet pod's own limit. Its p99 (keep-alive and a new connection per
//! request) alone and under each flood, interleaved within each run as the load table's baselines
//! are, so a drift of the machine touches all alike. A flood is wrk as fast as it goes from a pod of
//! its own: many keep-alive connections, or clients that connect anew for every request. Its
//! responses are counted by status and its failed connections beside them, so the row reads the same
//! whether the agent limits a pod's requests (HTTP 429) and connections (closed at accept, refused at
//! connect) or not: served is a 200, refused the rest.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use super::{
    Measure, Route,
    spread::Spread,
    wrk::{Connections, CountedLoad, Load, LoadResult, Requests},
};

/// How the flooding pod floods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flood {
    /// [`KEEP_ALIVE_FLOOD_CONNECTIONS`], request after request on each.
    KeepAlive,
    /// [`NEW_CONNECTION_FLOOD_CLIENTS`], each connecting anew for every request.
    NewConnections,
}

/// Twice the per-caller connection limit the agent has had (128, `imds::limits`): a flood this wide
/// meets a connection limit if there is one, and its refusals show as failed connections.
const KEEP_ALIVE_FLOOD_CONNECTIONS: usize = 256;
/// Enough clients to keep the agent accepting without pause; each closes after one request.
const NEW_CONNECTION_FLOOD_CLIENTS: usize = 64;
/// Between two requests of the quiet pod: about 50 a second, half the agent's default per-pod rate.
const QUIET_PAUSE: Duration = Duration::from_millis(20);
/// The flood runs this long before the quiet pod's load starts, and as long after it ends.
const FLOOD_MARGIN: Duration = Duration::from_secs(1);
/// The quiet pod's p99 under a flood should stay within this many times its p99 alone.
const P99_RATIO_TARGET: f64 = 2.0;

const FLOODS: [Flood; 2] = [Flood::KeepAlive, Flood::NewConnections];
const QUIET_CONNECTIONS: [Connections; 2] = [Connections::KeepAlive, Connections::NewPerRequest];

impl Flood {
    fn clients(self) -> usize {
        match self {
            Flood::KeepAlive => KEEP_ALIVE_FLOOD_CONNECTIONS,
            Flood::NewConnections => NEW_CONNECTION_FLOOD_CLIENTS,
        }
    }

    fn connections(self) -> Connections {
        match self {
            Flood::KeepAlive => Connections::KeepAlive,
            Flood::NewConnections => Connections::NewPerRequest,
        }
    }

    fn label(self) -> String {
        match self {
            Flood::KeepAlive => format!("keep-alive flood ({KEEP_ALIVE_FLOOD_CONNECTIONS} connections)"),
            Flood::NewConnections => {
                format!("new-connection flood ({NEW_CONNECTION_FLOOD_CLIENTS} clients)")
            }
        }
    }
}

/// What the quiet pod's load ran beside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    Alone,
    Flooded(Flood),
}

const CONDITIONS: [Condition; 3] = [
    Condition::Alone,
    Condition::Flooded(Flood::KeepAlive),
    Condition::Flooded(Flood::NewConnections),
];

impl Condition {
    fn label(self) -> String {
        match self {
            Condition::Alone => "alone".to_owned(),
            Condition::Flooded(flood) => format!("under {}", flood.label()),
        }
    }
}

/// Every run of the quiet pod's loads and of the floods.
pub struct FloodReport {
    runs: usize,
    seconds_per_load: u64,
    /// The quiet pod's loads by its connections and what ran beside them, one per run.
    quiet: BTreeMap<(Connections, Condition), Vec<CountedLoad>>,
    /// Each flood's loads: one per run and kind of quiet connection.
    floods: BTreeMap<Flood, Vec<CountedLoad>>,
}

/// `runs` runs of the quiet pod's loads (one client for `duration`) alone and under each flood, from
/// `quiet`; the floods from `flooder`, a pod of its own.
pub async fn measure(
    quiet: &Route<'_>,
    flooder: &Route<'_>,
    runs: usize,
    duration: Duration,
) -> Result<FloodReport> {
    let mut report = FloodReport {
        runs,
        seconds_per_load: duration.as_secs(),
        quiet: BTreeMap::new(),
        floods: BTreeMap::new(),
    };
    for run_index in 0..runs {
        for connections in QUIET_CONNECTIONS {
            for condition in CONDITIONS {
                let (result, flood_result) =
                    quiet_beside(quiet, flooder, connections, condition, duration).await?;
                eprintln!(
                    "bench: run {} quiet {} {}: p99 {:.0} us, {} not 200",
                    run_index + 1,
                    connections.label(),
                    condition.label(),
                    result.result.p99_us,
                    result.statuses.not_ok()
                );
                if let (Condition::Flooded(flood), Some(flood_result)) = (condition, flood_result) {
                    report.floods.entry(flood).or_default().push(flood_result);
                }
                report
                    .quiet
                    .entry((connections, condition))
                    .or_default()
                    .push(result);
            }
        }
    }
    Ok(report)
}

/// One load of the quiet pod (one client for `duration`) in `condition`: the flood, when there is one,
/// starts [`FLOOD_MARGIN`] before it and ends as long after. Its result, and the flood's.
async fn quiet_beside(
    quiet: &Route<'_>,
    flooder: &Route<'_>,
    connections: Connections,
    condition: Condition,
    duration: Duration,
) -> Result<(CountedLoad, Option<CountedLoad>)> {
    let quiet_load = Load {
        url: &quiet.url,
        clients: 1,
        connections,
        duration,
    };
    let asking = Requests::Sdk {
        token: false,
        pause: QUIET_PAUSE,
    };
    let quiet_run = quiet_load.run_counting(quiet.pod, quiet.cgroup, asking);
    let Condition::Flooded(flood) = condition else {
        return Ok((quiet_run.await?, None));
    };
    let flooding = Load {
        url: &flooder.url,
        clients: flood.clients(),
        connections: flood.connections(),
        duration: duration + 2 * FLOOD_MARGIN,
    };
    let flooding = flooding.run_counting(flooder.pod, flooder.cgroup, Requests::Url);
    let quiet_run = async {
        tokio::time::sleep(FLOOD_MARGIN).await;
        quiet_run.await
    };
    let (flood_result, quiet_result) = tokio::try_join!(flooding, quiet_run)?;
    Ok((quiet_result, Some(flood_result)))
}

impl FloodReport {
    fn quiet_spread(
        &self,
        connections: Connections,
        condition: Condition,
        of: fn(&LoadResult) -> f64,
    ) -> Spread {
        let values: Vec<f64> = self.quiet[&(connections, condition)]
            .iter()
            .map(|load| of(&load.result))
            .collect();
        Spread::of(&values)
    }

    /// A figure of the quiet pod's loads under `flood` over the same alone, of the medians.
    fn ratio(&self, connections: Connections, flood: Flood, of: fn(&LoadResult) -> f64) -> f64 {
        self.quiet_spread(connections, Condition::Flooded(flood), of)
            .median
            / self.quiet_spread(connections, Condition::Alone, of).median
    }

    /// The spread of one count over a flood's loads (one per run and kind of quiet connection).
    fn flood_spread(&self, flood: Flood, of: impl Fn(&CountedLoad) -> u64) -> Spread {
        let values: Vec<f64> = self.floods[&flood].iter().map(|load| of(load) as f64).collect();
        Spread::of(&values)
    }

    /// How long each flood ran: the quiet load and a margin on either side.
    fn flood_seconds(&self) -> u64 {
        self.seconds_per_load + 2 * FLOOD_MARGIN.as_secs()
    }

    pub fn print(&self) {
        println!(
            "\nflood: a quiet pod asking for its cached credentials as an SDK does (1 client, {} ms \
             between requests) alone and while another pod floods the agent; ratio = under flood / \
             alone (target for p99: at most {P99_RATIO_TARGET})",
            QUIET_PAUSE.as_millis()
        );
        let [keep_alive, new_connections] = FLOODS.map(Flood::label);
        println!(
            "{:<22} {:<28} {:<36} {:>6} {:<36} {:>6}",
            "quiet pod", "alone", keep_alive, "ratio", new_connections, "ratio"
        );
        for connections in QUIET_CONNECTIONS {
            for measure in [Measure::P99, Measure::REQUESTS_PER_SEC] {
                let cell = |condition| measure.cell(self.quiet_spread(connections, condition, measure.of));
                let ratio = |flood| self.ratio(connections, flood, measure.of);
                println!(
                    "{:<22} {:<28} {:<36} {:>6.2} {:<36} {:>6.2}",
                    format!("{} {}", connections.label(), measure.name),
                    cell(Condition::Alone),
                    cell(Condition::Flooded(Flood::KeepAlive)),
                    ratio(Flood::KeepAlive),
                    cell(Condition::Flooded(Flood::NewConnections)),
                    ratio(Flood::NewConnections),
                );
            }
        }
        let quiet_refused: u64 = self
            .quiet
            .values()
            .flatten()
            .map(|load| load.statuses.not_ok())
            .sum();
        let quiet_failed: u64 = self
            .quiet
            .values()
            .flatten()
            .map(|load| load.result.socket_errors)
            .sum();
        println!(
            "quiet pod over all runs: {quiet_refused} responses not 200, {quiet_failed} failed connections"
        );
        let count = |spread: Spread| format!("{:.0} [{:.0}-{:.0}]", spread.median, spread.min, spread.max);
        for flood in FLOODS {
            println!(
                "{}, each flood of {} s: served (200) {}, refused 429 {}, other statuses {}, failed or closed \
                 connections {}",
                flood.label(),
                self.flood_seconds(),
                count(self.flood_spread(flood, |load| load.statuses.of(200))),
                count(self.flood_spread(flood, |load| load.statuses.of(429))),
                count(self.flood_spread(flood, refused_other_status)),
                count(self.flood_spread(flood, |load| load.result.socket_errors)),
            );
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let quiet: Vec<serde_json::Value> = self
            .quiet
            .iter()
            .map(|(&(connections, condition), runs)| {
                json!({
                    "connections": connections,
                    "flood": match condition {
                        Condition::Alone => None,
                        Condition::Flooded(flood) => Some(flood),
                    },
                    "p99_us": self.quiet_spread(connections, condition, |r| r.p99_us),
                    "requests_per_sec": self.quiet_spread(connections, condition, |r| r.requests_per_sec),
                    "p99_ratio_to_alone": match condition {
                        Condition::Alone => None,
                        Condition::Flooded(flood) => Some(self.ratio(connections, flood, |r| r.p99_us)),
                    },
                    "runs": runs,
                })
            })
            .collect();
        let floods: Vec<serde_json::Value> = self
            .floods
            .iter()
            .map(|(&flood, runs)| {
                json!({
                    "flood": flood,
                    "clients": flood.clients(),
                    "connections": flood.connections(),
                    "seconds": self.flood_seconds(),
                    "served": self.flood_spread(flood, |load| load.statuses.of(200)),
                    "refused_429": self.flood_spread(flood, |load| load.statuses.of(429)),
                    "refused_other_status": self.flood_spread(flood, refused_other_status),
                    "failed_connections": self.flood_spread(flood, |load| load.result.socket_errors),
                    "runs": runs,
                })
            })
            .collect();
        json!({
            "runs": self.runs,
            "seconds_per_quiet_load": self.seconds_per_load,
            "p99_ratio_target": P99_RATIO_TARGET,
            "quiet": quiet,
            "floods": floods,
        })
    }
}

/// A flood's responses with a status other than 200 and 429.
fn refused_other_status(load: &CountedLoad) -> u64 {
    load.statuses.not_ok() - load.statuses.of(429)
}
