//! Simulated nodes' STS calls over hours of sessions: the real [`CredentialCache`] with its background
//! refresher, 110 pods a node whose SDKs ask for credentials as botocore does, and an STS that logs
//! every call, all on tokio's paused clock, which the cache's time of day follows ([`PausedTiming`]),
//! with jitter drawn from a fixed sequence: the same figures on every run, in a fraction of a second.
//! They back the STS figures of docs/scale.md; `cargo test --lib creds::simulation -- --nocapture`
//! prints them.

use std::collections::{BTreeMap, HashSet};

use tokio::task::JoinSet;

use super::{tests::PausedTiming, *};
use crate::policy::{
    RoleArn, SessionName,
    tags::{PodNames, SessionTagging, SessionTags},
};

/// Kubernetes' default, and largest recommended, number of pods on a node.
const PODS: usize = 110;
/// The shared case: the node's pods are 22 workloads of 5 replicas, each naming one session for its
/// replicas (`iam.amazonaws.com/session-name` in the pod template), so 22 sessions.
const SHARED_SESSIONS: usize = 22;
/// The agent's default `--iam-role-session-ttl`.
const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);
/// kube2iam's default `--iam-role-session-ttl`, which a kube2iam values file may carry over.
const KUBE2IAM_SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// How long STS takes to answer (kube2iam #31: over 100 ms).
const STS_LATENCY: Duration = Duration::from_millis(100);
/// botocore asks again when the set it holds has this much left (its advisory refresh).
const SDK_ASKS_WITH_LEFT: Duration = Duration::from_secs(15 * 60);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// One AssumeRole call: when it came (since the simulation began) and for which session.
#[derive(Clone)]
struct Call {
    at: Duration,
    session: SessionKey,
}

/// An STS that answers every call after [`STS_LATENCY`] with a set of the duration asked for, issued
/// by the simulation's clock, and logs the call.
struct CountingSts {
    timing: Arc<PausedTiming>,
    calls: Mutex<Vec<Call>>,
}

#[async_trait::async_trait]
impl AssumeRole for CountingSts {
    async fn assume_role(&self, session: &SessionKey, duration: Duration) -> Result<Credentials, StsError> {
        self.calls.lock().unwrap().push(Call {
            at: self.timing.elapsed(),
            session: session.clone(),
        });
        tokio::time::sleep(STS_LATENCY).await;
        let issued = self.timing.now();
        Ok(Credentials {
            access_key_id: "ASIASIMULATED".to_owned(),
            secret_access_key: Secret::new(String::new()),
            session_token: Secret::new(String::new()),
            issued,
            expiration: issued + duration,
            documents: Documents::default(),
        })
    }
}

/// The simulated cluster's clock, its one STS, and its agents' `--iam-role-session-ttl`.
struct Simulation {
    timing: Arc<PausedTiming>,
    sts: Arc<CountingSts>,
    session_ttl: Duration,
}

/// The agent a node's pods reach; a restart puts a new one, with an empty cache, in its place.
type AgentSlot = Arc<Mutex<Arc<CredentialCache>>>;

/// A node: its agent, and its pods' SDKs, which stop when the node is dropped.
struct Node {
    agent: AgentSlot,
    sessions: Vec<SessionKey>,
    _pods: JoinSet<()>,
}

impl Simulation {
    fn new(timing: Arc<PausedTiming>, session_ttl: Duration) -> Self {
        let sts = Arc::new(CountingSts {
            timing: timing.clone(),
            calls: Mutex::default(),
        });
        Self {
            timing,
            sts,
            session_ttl,
        }
    }

    /// A freshly started agent, refreshing in the background as the agent does.
    fn agent(&self) -> Arc<CredentialCache> {
        let cache = Arc::new(
            CredentialCache::new(self.sts.clone(), self.session_ttl, 10_000).with_timing(self.timing.clone()),
        );
        // The task ends by itself once the cache is gone.
        drop(cache.spawn_refresher(REFRESH_CHECK));
        cache
    }

    /// A node whose pods use `sessions`, one each, each pod's SDK asking first after `first_ask`.
    fn node(&self, sessions: Vec<SessionKey>, mut first_ask: impl FnMut() -> Duration) -> Node {
        let agent: AgentSlot = Arc::new(Mutex::new(self.agent()));
        let mut pods = JoinSet::new();
        for session in &sessions {
            pods.spawn(sdk(
                agent.clone(),
                self.timing.clone(),
                session.clone(),
                first_ask(),
            ));
        }
        Node {
            agent,
            sessions,
            _pods: pods,
        }
    }

    /// A node whose pods' SDKs hold sets from before the simulation: each asks first at a point drawn
    /// in the time such a set lasts before botocore asks again (45 minutes for an hour's set).
    fn running_node(&self, sessions: Vec<SessionKey>) -> Node {
        let (timing, held_for) = (
            self.timing.clone(),
            self.session_ttl.saturating_sub(SDK_ASKS_WITH_LEFT),
        );
        self.node(sessions, move || held_for.mul_f64(timing.random_fraction()))
    }

    /// The calls so far.
    fn calls(&self) -> Calls {
        Calls(self.sts.calls.lock().unwrap().clone())
    }

    /// Lets the simulated time run on for `duration`.
    async fn run_for(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

impl Node {
    /// The DaemonSet's restart: a new agent, with an empty cache, takes the old one's place.
    fn restart(&self, sim: &Simulation) {
        *self.agent.lock().unwrap() = sim.agent();
    }

    /// Every pod asks the agent at once (new processes, or every pod restarted with the agent): the
    /// worst case for a cold cache. Returns once all are answered.
    async fn every_pod_asks(&self) {
        let cache = self.agent.lock().unwrap().clone();
        let mut asks = JoinSet::new();
        for session in self.sessions.clone() {
            let cache = cache.clone();
            asks.spawn(async move { cache.get(&session).await.map(drop) });
        }
        while let Some(answer) = asks.join_next().await {
            answer.unwrap().expect("the simulated STS always answers");
        }
    }
}

/// A pod's SDK: asks the node's agent for its session's set after `first_ask`, then again whenever
/// the set it holds has [`SDK_ASKS_WITH_LEFT`] left, for ever.
async fn sdk(agent: AgentSlot, timing: Arc<PausedTiming>, session: SessionKey, first_ask: Duration) {
    tokio::time::sleep(first_ask).await;
    loop {
        // The agent as it is now: the one a restart replaced is gone once its last request is answered.
        let cache = agent.lock().unwrap().clone();
        let set = cache
            .get(&session)
            .await
            .expect("the simulated STS always answers");
        drop(cache);
        let left = set.expiration.duration_since(timing.now()).unwrap_or_default();
        // A set of 15 minutes has less than that left from the start, and botocore asks again on each
        // of the program's calls: one a minute here.
        tokio::time::sleep(left.saturating_sub(SDK_ASKS_WITH_LEFT).max(MINUTE)).await;
    }
}

fn session(role: &str, name: &str) -> SessionKey {
    SessionKey {
        role: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{role}")).unwrap(),
        external_id: None,
        session_name: SessionName::sanitize(name),
        tags: SessionTags::default(),
    }
}

/// Node `node`'s 110 pods, each its own session: the worst case, and the default for every pod that
/// names a role (the default session name is `<namespace>.<pod>`).
fn own_sessions(node: usize) -> Vec<SessionKey> {
    (0..PODS)
        .map(|pod| session("app", &format!("shop.n{node}-pod-{pod}")))
        .collect()
}

/// Node `node`'s 110 pods over [`SHARED_SESSIONS`] sessions.
fn shared_sessions(node: usize) -> Vec<SessionKey> {
    (0..PODS)
        .map(|pod| {
            let workload = pod % SHARED_SESSIONS;
            session(
                &format!("app-{workload}"),
                &format!("shop.n{node}-app-{workload}"),
            )
        })
        .collect()
}

/// [`shared_sessions`] with `--session-tags`: each pod's session carries its own name and uid, so the
/// pods that share a session name no longer share a session.
fn shared_sessions_tagged(node: usize) -> Vec<SessionKey> {
    shared_sessions(node)
        .into_iter()
        .enumerate()
        .map(|(pod, session)| {
            let workload = pod % SHARED_SESSIONS;
            let (name, uid) = (
                format!("n{node}-app-{workload}-{pod}"),
                format!("uid-{node}-{pod}"),
            );
            let names = PodNames {
                namespace: "shop",
                service_account: &format!("app-{workload}"),
                name: &name,
                uid: &uid,
            };
            SessionKey {
                tags: SessionTags::for_pod(&SessionTagging::default(), names).unwrap(),
                ..session
            }
        })
        .collect()
}

/// The calls STS saw.
struct Calls(Vec<Call>);

impl Calls {
    fn between(&self, from: Duration, to: Duration) -> usize {
        self.0.iter().filter(|call| (from..to).contains(&call.at)).count()
    }

    /// How many sessions had calls between `from` and `to`.
    fn sessions_between(&self, from: Duration, to: Duration) -> usize {
        let calls = self.0.iter().filter(|call| (from..to).contains(&call.at));
        calls.map(|call| &call.session).collect::<HashSet<_>>().len()
    }

    /// The calls between `from` and `to`, by the background check's interval they came in.
    fn per_check(&self, from: Duration, to: Duration) -> BTreeMap<u128, usize> {
        let mut per_check = BTreeMap::new();
        for call in self.0.iter().filter(|call| (from..to).contains(&call.at)) {
            *per_check
                .entry(call.at.as_nanos() / REFRESH_CHECK.as_nanos())
                .or_default() += 1;
        }
        per_check
    }

    /// The most calls that came within one background check's interval, between `from` and `to`.
    fn most_in_one_check(&self, from: Duration, to: Duration) -> usize {
        self.per_check(from, to).into_values().max().unwrap_or(0)
    }

    /// The shortest and the longest time between two calls for one session, from `from` on.
    fn intervals_from(&self, from: Duration) -> (Duration, Duration) {
        let mut last: HashMap<&SessionKey, Duration> = HashMap::new();
        let (mut shortest, mut longest) = (Duration::MAX, Duration::ZERO);
        for call in &self.0 {
            if let Some(previous) = last.insert(&call.session, call.at)
                && previous >= from
            {
                shortest = shortest.min(call.at - previous);
                longest = longest.max(call.at - previous);
            }
        }
        (shortest, longest)
    }
}

fn minutes(duration: Duration) -> String {
    format!("{:.1} min", duration.as_secs_f64() / 60.0)
}

#[tokio::test(start_paused = true)]
async fn at_steady_state_each_session_costs_one_call_per_refresh_window() {
    println!("steady state, one node of {PODS} pods, hours 1 to 5:");
    let second = Duration::from_secs(1);
    // When a set of the session TTL is refreshed, after its issue (the refresh window).
    let hour_window = (22 * MINUTE + 30 * second, 30 * MINUTE);
    let quarter_hour_window = (2 * MINUTE + 30 * second, 2 * MINUTE + 30 * second);
    for (case, session_ttl, sessions, count, (earliest, latest)) in [
        (
            "1 h sessions, every pod its own",
            DEFAULT_SESSION_TTL,
            own_sessions(0),
            PODS,
            hour_window,
        ),
        (
            "1 h sessions, 110 pods over 22",
            DEFAULT_SESSION_TTL,
            shared_sessions(0),
            SHARED_SESSIONS,
            hour_window,
        ),
        (
            "1 h sessions, 110 pods sharing 22 session names, --session-tags",
            DEFAULT_SESSION_TTL,
            shared_sessions_tagged(0),
            PODS,
            hour_window,
        ),
        (
            "15 min sessions, every pod its own",
            KUBE2IAM_SESSION_TTL,
            own_sessions(0),
            PODS,
            quarter_hour_window,
        ),
    ] {
        let sim = Simulation::new(PausedTiming::seeded(1), session_ttl);
        let _node = sim.running_node(sessions);
        sim.run_for(5 * HOUR).await;
        let calls = sim.calls();
        let per_hour = calls.between(HOUR, 5 * HOUR) as f64 / 4.0;
        let per_session_hour = per_hour / count as f64;
        let (shortest, longest) = calls.intervals_from(HOUR);
        println!(
            "  {case}: {per_hour:.1} calls/h for the node ({:.4} calls/s), {per_session_hour:.2} per \
             session; between a session's calls {} to {}; at most {} calls in one 15 s check",
            per_hour / 3600.0,
            minutes(shortest),
            minutes(longest),
            calls.most_in_one_check(HOUR, 5 * HOUR),
        );
        // One session per pod, or per shared name, or (tagged) per pod again: the cache's key.
        assert_eq!(calls.sessions_between(HOUR, 5 * HOUR), count, "{case}");
        // A set is refreshed in its window, at the first check from then, its call behind at most the
        // node's other due sets, 16 at a time.
        assert!(shortest >= earliest, "{case}: {shortest:?}");
        assert!(longest <= latest + REFRESH_CHECK + second, "{case}: {longest:?}");
        assert!(
            per_session_hour <= HOUR.as_secs_f64() / earliest.as_secs_f64(),
            "{case}: {per_session_hour} calls per session-hour"
        );
    }
}

/// Runs a node of `sessions` (`count` of them) for two hours, restarts its agent, lets every pod ask
/// at once when `every_pod_asks`, runs two hours more, and prints the calls. Checks that each session
/// cost one call when its pods next asked (within the 45 minutes their SDKs' sets last), and no
/// second one before that set's refresh window. Returns the calls at once (within an STS call's time
/// of the restart).
async fn restart(case: &str, sessions: Vec<SessionKey>, count: usize, every_pod_asks: bool) -> usize {
    let sim = Simulation::new(PausedTiming::seeded(1), DEFAULT_SESSION_TTL);
    let node = sim.running_node(sessions);
    let restarted = 2 * HOUR;
    sim.run_for(restarted).await;
    node.restart(&sim);
    if every_pod_asks {
        node.every_pod_asks().await;
    }
    sim.run_for(2 * HOUR).await;
    let calls = sim.calls();
    let at_once = calls.between(restarted, restarted + STS_LATENCY);
    println!(
        "  {case}: {at_once} calls at once, {} in the first minute, {} in the first 10 minutes, {} in \
         the first hour (the hour before: {}), at most {} in one 15 s check",
        calls.between(restarted, restarted + MINUTE),
        calls.between(restarted, restarted + 10 * MINUTE),
        calls.between(restarted, restarted + HOUR),
        calls.between(restarted - HOUR, restarted),
        calls.most_in_one_check(restarted, restarted + 2 * HOUR),
    );
    let asked_by = restarted + DEFAULT_SESSION_TTL - SDK_ASKS_WITH_LEFT + STS_LATENCY;
    assert_eq!(calls.sessions_between(restarted, asked_by), count, "{case}");
    let (shortest, _) = calls.intervals_from(restarted);
    assert!(shortest >= 22 * MINUTE + MINUTE / 2, "{case}: {shortest:?}");
    at_once
}

#[tokio::test(start_paused = true)]
async fn an_agent_restart_calls_sts_once_per_session_as_its_pods_next_ask() {
    println!("an agent restart, one node of {PODS} pods:");
    for (case, sessions, count) in [
        ("own sessions, SDKs ask when due", own_sessions(0), PODS),
        (
            "22 sessions, SDKs ask when due",
            shared_sessions(0),
            SHARED_SESSIONS,
        ),
    ] {
        assert_eq!(restart(case, sessions, count, false).await, 0, "{case}: a burst");
    }
    for (case, sessions, count) in [
        ("own sessions, every pod asks at once", own_sessions(0), PODS),
        (
            "22 sessions, every pod asks at once",
            shared_sessions(0),
            SHARED_SESSIONS,
        ),
    ] {
        let at_once = restart(case, sessions, count, true).await;
        assert_eq!(
            at_once, count,
            "{case}: one call per session, however many pods share it"
        );
    }
}

/// `nodes` nodes whose agents started together, every pod asking at once (a restart window's worst
/// case), over 5 hours: the most calls in one 15 s check in each hour, and how many of the last hour's
/// checks had calls.
async fn refreshes_after_one_restart_window(nodes: usize, timing: Arc<PausedTiming>) -> (Vec<usize>, usize) {
    let sim = Simulation::new(timing, DEFAULT_SESSION_TTL);
    let _nodes: Vec<Node> = (0..nodes)
        .map(|node| sim.node(own_sessions(node), || Duration::ZERO))
        .collect();
    sim.run_for(5 * HOUR).await;
    let calls = sim.calls();
    let peaks = (0..5)
        .map(|hour| calls.most_in_one_check(hour * HOUR, (hour + 1) * HOUR))
        .collect();
    (peaks, calls.per_check(4 * HOUR, 5 * HOUR).len())
}

#[tokio::test(start_paused = true)]
async fn sets_issued_in_one_restart_window_are_refreshed_spread_out() {
    const NODES: usize = 4;
    let sets = NODES * PODS;
    println!("{NODES} nodes restarted together, every pod asking at once ({sets} sets at once):");
    let (lockstep, lockstep_checks) =
        refreshes_after_one_restart_window(NODES, PausedTiming::without_jitter()).await;
    println!(
        "  without jitter: most calls in one 15 s check, hour by hour: {lockstep:?}; checks with calls \
         in hour 5: {lockstep_checks} of 240"
    );
    let (jittered, jittered_checks) =
        refreshes_after_one_restart_window(NODES, PausedTiming::seeded(1)).await;
    println!(
        "  with jitter:    most calls in one 15 s check, hour by hour: {jittered:?}; checks with calls \
         in hour 5: {jittered_checks} of 240"
    );
    assert!(lockstep.iter().all(|&peak| peak == sets), "{lockstep:?}");
    assert_eq!(jittered[0], sets, "the restart's own calls");
    assert!(
        jittered[1..].iter().all(|&peak| peak <= sets / 10),
        "{jittered:?}"
    );
    assert!(
        jittered[4] <= jittered[1],
        "the refreshes bunched up again: {jittered:?}"
    );
}
