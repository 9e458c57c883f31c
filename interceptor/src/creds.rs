//! creds: temporary credentials for each session ([`SessionKey`]), from STS AssumeRole signed with the
//! agent's own credentials. The cache makes one STS call per key at a time however many callers wait,
//! gives every call [`STS_CALL_TIMEOUT`], and refreshes sessions in the background well before they
//! expire, each set at a point drawn for it ([`RefreshWindow`]) so that sets issued together are not
//! refreshed together, many at once so that one hung call stalls no other session. A set with less
//! than 20 minutes left is served only while a fresh one is being fetched: a request waits for STS
//! only when its session has no usable set at all.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::{Duration, SystemTime},
};

pub mod metrics;
#[cfg(test)]
mod simulation;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use bytes::Bytes;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};

pub use self::metrics::CacheMetrics;
use self::metrics::{LookupResult, StsResult};
use crate::policy::{SessionKey, tags::SessionTags};

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One set of temporary credentials.
#[derive(Debug)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub issued: SystemTime,
    pub expiration: SystemTime,
    /// The set as the metadata API serves it, rendered there on first use.
    pub documents: Documents,
}

/// A set's two documents (plain and extended) as the metadata API serves them, each rendered by its
/// first serve and then served as it is: a set never changes, so neither do its documents, and
/// rendering the JSON and times on every request was a tenth of the agent's time per cached request.
/// `Debug` never shows them: they hold the secret.
#[derive(Default)]
pub struct Documents([OnceLock<Bytes>; 2]);

impl Documents {
    pub fn get_or_render(&self, extended: bool, render: impl FnOnce() -> Bytes) -> Bytes {
        self.0[usize::from(extended)].get_or_init(render).clone()
    }
}

impl fmt::Debug for Documents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<rendered on use>")
    }
}

impl Credentials {
    fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration.duration_since(now).unwrap_or_default()
    }

    fn lifetime(&self) -> Duration {
        self.expiration.duration_since(self.issued).unwrap_or_default()
    }

    /// What the set must have left to be fit to serve: [`MIN_REMAINING`], or two thirds of its lifetime
    /// for sessions too short to ever have 20 minutes.
    fn min_remaining(&self) -> Duration {
        MIN_REMAINING.min(self.lifetime() / 3 * 2)
    }

    /// How long after it is issued the set stays fit to serve.
    fn fit_for(&self) -> Duration {
        self.lifetime() - self.min_remaining()
    }
}

/// botocore refreshes credentials with less than 15 minutes left (10 mandatory); serving fewer than 20
/// makes it call again at once.
pub const MIN_REMAINING: Duration = Duration::from_secs(20 * 60);

/// Whether a set is fit to serve: at least [`MIN_REMAINING`] left, or two thirds of its lifetime for
/// sessions too short to ever have 20 minutes.
pub fn fit_to_serve(creds: &Credentials, now: SystemTime) -> bool {
    creds.remaining(now) >= creds.min_remaining()
}

/// How often the agent's background task looks for sets due for refresh
/// ([`CredentialCache::spawn_refresher`]).
pub const REFRESH_CHECK: Duration = Duration::from_secs(15);

/// How long before a set turns unfit to serve the background task replaces it, when the set is fit
/// for long enough: time for several more checks and calls if the first refresh fails.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How much earlier than its latest point a set may be refreshed, as a fraction of the time from its
/// issue to that point. Sets issued together (a node's, when its agent starts and its pods first ask; a
/// cluster's, when STS comes back) would otherwise be refreshed together, every half-lifetime, for as
/// long as they live. A quarter spreads an hour's sets over 7.5 minutes, at the cost of one refresh in
/// seven more (one every 26 minutes on average instead of every 30).
const REFRESH_JITTER: f64 = 0.25;

/// When the background task may replace a set, as a span of time; each set is refreshed at a point
/// drawn in it once, when the set lands ([`RefreshWindow::at`]).
///
/// The latest point: halfway through the set's life or [`REFRESH_MARGIN`] before it turns unfit,
/// whichever comes first, but never before halfway through the time it is fit. The floor is for short
/// sessions: a 15-minute one (kube2iam's default) is fit for 5 minutes, so it is refreshed once, 2.5
/// minutes in, with 2.5 minutes to spare, instead of on every check. The earliest point:
/// [`REFRESH_JITTER`] of the latest one's age before it, and never before the floor either. Earlier
/// only, so a set is still replaced before it turns unfit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefreshWindow {
    earliest: SystemTime,
    latest: SystemTime,
}

impl RefreshWindow {
    fn of(creds: &Credentials) -> Self {
        let fit_for = creds.fit_for();
        let floor = fit_for / 2;
        let latest = fit_for
            .saturating_sub(REFRESH_MARGIN)
            .min(creds.lifetime() / 2)
            .max(floor);
        let earliest = latest.mul_f64(1.0 - REFRESH_JITTER).max(floor);
        Self {
            earliest: creds.issued + earliest,
            latest: creds.issued + latest,
        }
    }

    /// The point `random` (in [0, 1)) of the way back from the latest point to the earliest: 0 is the
    /// latest.
    fn at(&self, random: f64) -> SystemTime {
        let span = self.latest.duration_since(self.earliest).unwrap_or_default();
        self.latest - span.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// A set no longer fit to serve is still served, at once, while a fresh one is fetched, if it has this
/// much left: it is the caller's own session, and better than a wait on STS or an error.
const LAST_RESORT_REMAINING: Duration = Duration::from_secs(5 * 60);

/// How long one AssumeRole call may take before the agent gives up on it. STS answers in well under a
/// second when healthy, so a slower call is a call in trouble. Only a request whose session has no
/// usable set waits for a call, and never longer than this: a 503 with Retry-After at 2 s still leaves
/// aws-sdk-rust (1 s per attempt, 4 attempts) and aws-sdk-go-v2 (5 s per operation) attempts to retry
/// with. botocore's 1 s is shorter than any call to STS can be promised, but the call outlives the
/// request that started it, so botocore's next attempt finds the set in the cache.
pub const STS_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The background task's wait before it retries a session whose last call failed: doubling from the
/// first to the last, each scaled by a random factor in [1/2, 1) (jitter), so that the sessions of a
/// node, or of nodes, that failed together (STS down, throttling) do not retry together.
const RETRY_FIRST: Duration = Duration::from_secs(15);
const RETRY_LAST: Duration = Duration::from_secs(10 * 60);

/// Requests back off too, more briefly: after a failed call, the session's requests get its failure
/// (a 503 with Retry-After) without a call for a wait doubling from the first to the last, jittered
/// the same way. While STS is down or throttling, a session whose pods ask without pause calls about
/// once a second instead of as fast as the calls fail, and its pods are served again within
/// [`REQUEST_RETRY_LAST`] (and the call) of STS's return. `--iam-role-error-ttl`, when longer, wins.
const REQUEST_RETRY_FIRST: Duration = Duration::from_millis(250);
const REQUEST_RETRY_LAST: Duration = Duration::from_secs(2);

/// The wait after the `failures`-th failure in a row (from 1), before jitter: `first`, doubled with
/// each further failure, at most `last`.
fn backoff(failures: u32, first: Duration, last: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    first.saturating_mul(1 << doublings).min(last)
}

fn retry_delay(failures: u32) -> Duration {
    backoff(failures, RETRY_FIRST, RETRY_LAST)
}

fn request_retry_delay(failures: u32) -> Duration {
    backoff(failures, REQUEST_RETRY_FIRST, REQUEST_RETRY_LAST)
}

/// `delay` scaled by `1/2 + random/2`, with `random` in [0, 1).
fn jittered(delay: Duration, random: f64) -> Duration {
    delay.mul_f64(0.5 + random.clamp(0.0, 1.0) / 2.0)
}

/// A uniform number in [0, 1) from the kernel's random source.
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    f64::from(u32::from_ne_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

/// What the cache's schedule reads besides tokio's clock: the time of day that sets' issue and expiry
/// are measured in, and the random fractions that jitter refreshes and retries. The agent's is
/// [`SystemTiming`]; the tests' follows tokio's paused clock and draws a fixed sequence, so that hours
/// of sessions run in a moment, the same way every run.
trait Timing: Send + Sync {
    fn now(&self) -> SystemTime;

    /// A uniform number in [0, 1).
    fn random_fraction(&self) -> f64;
}

/// The system's clock and the kernel's random source.
struct SystemTiming;

impl Timing for SystemTiming {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn random_fraction(&self) -> f64 {
        random_fraction()
    }
}

/// How many background refreshes call STS at once: enough that a few hung calls hold up no other
/// session, few enough that a node with thousands of sessions does not flood STS when they come due
/// together (after an outage, say).
pub const MAX_CONCURRENT_REFRESHES: usize = 16;

/// Why AssumeRole gave no credentials. A timeout is told apart: it is STS in trouble, not a refusal.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StsError {
    /// STS refused or could not be reached, or the call brought no usable set; `message` says which.
    #[error("STS AssumeRole of {role} failed: {message}")]
    Failed { role: String, message: String },
    /// STS refused the call as over its request rate (the account's quota, shared by every caller).
    #[error("STS AssumeRole of {role} was throttled: {message}")]
    Throttled { role: String, message: String },
    /// STS gave no answer within the call's timeout.
    #[error("STS AssumeRole of {role} timed out: no answer within {}", humantime::format_duration(*after))]
    TimedOut { role: String, after: Duration },
}

/// The STS call, behind a trait so the cache is tested without AWS.
#[async_trait::async_trait]
pub trait AssumeRole: Send + Sync {
    async fn assume_role(&self, session: &SessionKey, duration: Duration) -> Result<Credentials, StsError>;
}

/// AssumeRole through `aws-sdk-sts`.
pub struct StsAssumeRole {
    client: aws_sdk_sts::Client,
    /// The agent's own credentials, which sign the calls.
    node_credentials: Option<SharedCredentialsProvider>,
}

impl StsAssumeRole {
    /// Signs with the agent's own credentials (aws-config's default chain); `region` and `endpoint`
    /// override what the chain finds.
    pub async fn from_env(region: Option<String>, endpoint: Option<String>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(endpoint) = endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        Self {
            client: aws_sdk_sts::Client::new(&config),
            node_credentials: config.credentials_provider(),
        }
    }

    /// Whether the agent has credentials of its own to sign AssumeRole with; why not when it has none.
    pub async fn node_credentials(&self) -> Result<(), String> {
        let provider = self
            .node_credentials
            .as_ref()
            .ok_or_else(|| "no credentials provider is configured".to_owned())?;
        provider
            .provide_credentials()
            .await
            .map(|_| ())
            .map_err(|err| aws_sdk_sts::error::DisplayErrorContext(err).to_string())
    }
}

/// The session's tags as AssumeRole takes them; none at all when there are none (STS refuses an empty
/// list from a caller not allowed `sts:TagSession` as readily as a full one).
fn sts_tags(tags: &SessionTags) -> Result<Option<Vec<aws_sdk_sts::types::Tag>>, String> {
    if tags.is_empty() {
        return Ok(None);
    }
    tags.iter()
        .map(|(key, value)| {
            aws_sdk_sts::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .map_err(|err| format!("session tag {key}: {err}"))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// STS's error codes for a caller over its request rate.
const THROTTLING_CODES: [&str; 3] = ["Throttling", "ThrottlingException", "RequestLimitExceeded"];

/// What a failed AssumeRole call was: throttled, or failed for any other reason.
fn call_failed<E, R>(session: &SessionKey, err: aws_sdk_sts::error::SdkError<E, R>) -> StsError
where
    E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sts::error::ProvideErrorMetadata;
    let throttled = err.code().is_some_and(|code| THROTTLING_CODES.contains(&code));
    let (role, message) = (
        session.role.to_string(),
        aws_sdk_sts::error::DisplayErrorContext(err).to_string(),
    );
    if throttled {
        StsError::Throttled { role, message }
    } else {
        StsError::Failed { role, message }
    }
}

fn transitive_tag_keys(tags: &SessionTags) -> Option<Vec<String>> {
    let keys: Vec<String> = tags.transitive_keys().map(str::to_owned).collect();
    (!keys.is_empty()).then_some(keys)
}

#[async_trait::async_trait]
impl AssumeRole for StsAssumeRole {
    async fn assume_role(&self, session: &SessionKey, duration: Duration) -> Result<Credentials, StsError> {
        let failed = |message: String| StsError::Failed {
            role: session.role.to_string(),
            message,
        };
        let issued = SystemTime::now();
        let output = self
            .client
            .assume_role()
            .role_arn(session.role.as_str())
            .role_session_name(session.session_name.as_str())
            .set_external_id(session.external_id.as_ref().map(|id| id.as_str().to_owned()))
            .set_tags(sts_tags(&session.tags).map_err(failed)?)
            .set_transitive_tag_keys(transitive_tag_keys(&session.tags))
            .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|err| call_failed(session, err))?;
        let creds = output
            .credentials()
            .ok_or_else(|| failed("the reply holds no credentials".to_owned()))?;
        let expiration = SystemTime::try_from(*creds.expiration())
            .map_err(|_| failed("the reply's expiration is out of range".to_owned()))?;
        Ok(Credentials {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: Secret::new(creds.secret_access_key().to_owned()),
            session_token: Secret::new(creds.session_token().to_owned()),
            issued,
            expiration,
            documents: Documents::default(),
        })
    }
}

/// What one STS call gives: a set, or why not. Everyone waiting for the call gets a copy.
type Fetched = Result<Arc<Credentials>, StsError>;

/// The STS call in flight for one session: every caller that needs its answer waits on this one
/// instead of making another.
#[derive(Clone)]
struct Flight(watch::Receiver<Option<Fetched>>);

impl Flight {
    /// A flight whose task ended without landing (it panicked, or the runtime is shutting down) never
    /// will; the next caller starts another.
    fn is_alive(&self) -> bool {
        !self.0.is_closed()
    }

    /// Waits for the call's answer; no longer than the call's own timeout.
    async fn landed(mut self, session: &SessionKey) -> Fetched {
        let answer = self
            .0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|answer| answer.clone());
        answer.unwrap_or_else(|| {
            Err(StsError::Failed {
                role: session.role.to_string(),
                message: "the call ended without an answer".to_owned(),
            })
        })
    }
}

/// One session's slot. The current set and the call in flight change together, under one lock, so a
/// caller never misses a set that just landed and starts a second call.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    last_used: Mutex<Option<SystemTime>>,
}

#[derive(Default)]
struct SlotState {
    current: Option<Held>,
    in_flight: Option<Flight>,
    /// The last call's, when it failed; a success clears it.
    failure: Option<Failure>,
}

/// The set a slot serves, and when the background task replaces it: a point of its [`RefreshWindow`]
/// drawn when it landed.
struct Held {
    set: Arc<Credentials>,
    refresh_at: SystemTime,
}

impl Held {
    fn new(set: Arc<Credentials>, random: f64) -> Self {
        let refresh_at = RefreshWindow::of(&set).at(random);
        Self { set, refresh_at }
    }
}

/// A session's last call failed: its error, answered without a call while it is remembered, and when
/// the background task and requests may call again.
struct Failure {
    error: StsError,
    /// Failed calls in a row.
    in_a_row: u32,
    /// The end of `--iam-role-error-ttl` (the failure's own time without one).
    remembered_until: SystemTime,
    /// The end of the requests' backoff.
    requests_not_before: tokio::time::Instant,
    /// The end of the background task's backoff.
    refresh_not_before: tokio::time::Instant,
}

impl SlotState {
    fn flight(&self) -> Option<Flight> {
        self.in_flight.clone().filter(Flight::is_alive)
    }

    /// The failure still remembered at `now`: within the error TTL, or the requests' backoff.
    fn remembered_failure(&self, now: SystemTime) -> Option<StsError> {
        let failure = self.failure.as_ref()?;
        let backing_off = tokio::time::Instant::now() < failure.requests_not_before;
        (now < failure.remembered_until || backing_off).then(|| failure.error.clone())
    }
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the background task should call for this slot at `now`: it holds no set, or its set's
    /// refresh point has come.
    fn refresh_due(&self, now: SystemTime) -> bool {
        self.state()
            .current
            .as_ref()
            .is_none_or(|held| now >= held.refresh_at)
    }

    fn touch(&self, now: SystemTime) {
        *self.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
    }

    fn last_used(&self) -> Option<SystemTime> {
        *self.last_used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps what a call brought and ends its flight: from here on callers see the new set, or start
    /// another call (when the call failed: after `error_ttl` and the requests' backoff). The set's
    /// refresh point, or the waits before the background task and requests call again, are drawn here,
    /// once per call.
    fn land(&self, fetched: &Fetched, error_ttl: Duration, timing: &dyn Timing) {
        let mut state = self.state();
        match fetched {
            Ok(creds) => {
                state.current = Some(Held::new(creds.clone(), timing.random_fraction()));
                state.failure = None;
            }
            Err(err) => {
                let in_a_row = state
                    .failure
                    .as_ref()
                    .map_or(1, |last| last.in_a_row.saturating_add(1));
                let now = tokio::time::Instant::now();
                state.failure = Some(Failure {
                    error: err.clone(),
                    in_a_row,
                    remembered_until: timing.now() + error_ttl,
                    requests_not_before: now
                        + jittered(request_retry_delay(in_a_row), timing.random_fraction()),
                    refresh_not_before: now + jittered(retry_delay(in_a_row), timing.random_fraction()),
                });
            }
        }
        state.in_flight = None;
    }
}

/// What a request finds in its session's slot.
enum Lookup {
    /// A set fit to serve.
    Hit(Arc<Credentials>),
    /// A set no longer fit but with minutes left, served while a call fetches the next one.
    Stale(Arc<Credentials>),
    /// No usable set: the request waits for the call.
    Miss(Flight),
    /// No usable set, and the last call failed within the error TTL: its failure, without a call.
    Failed(StsError),
}

impl Lookup {
    fn result(&self) -> LookupResult {
        match self {
            Self::Hit(_) => LookupResult::Hit,
            Self::Stale(_) => LookupResult::Stale,
            Self::Miss(_) | Self::Failed(_) => LookupResult::Miss,
        }
    }
}

/// Credentials by session, shared by every request.
pub struct CredentialCache {
    sts: Arc<dyn AssumeRole>,
    session_duration: Duration,
    sts_timeout: Duration,
    error_ttl: Duration,
    max_sessions: usize,
    slots: Mutex<HashMap<SessionKey, Arc<Slot>>>,
    metrics: CacheMetrics,
    timing: Arc<dyn Timing>,
}

impl CredentialCache {
    /// A cache whose STS calls time out after [`STS_CALL_TIMEOUT`].
    pub fn new(sts: Arc<dyn AssumeRole>, session_duration: Duration, max_sessions: usize) -> Self {
        Self {
            sts,
            session_duration,
            sts_timeout: STS_CALL_TIMEOUT,
            error_ttl: Duration::ZERO,
            max_sessions,
            slots: Mutex::new(HashMap::new()),
            metrics: CacheMetrics::default(),
            timing: Arc::new(SystemTiming),
        }
    }

    /// Reads the time of day and draws its jitter from `timing` instead of the system's.
    #[cfg(test)]
    fn with_timing(mut self, timing: Arc<dyn Timing>) -> Self {
        self.timing = timing;
        self
    }

    /// Gives every STS call `timeout` instead of [`STS_CALL_TIMEOUT`].
    pub fn with_sts_timeout(mut self, timeout: Duration) -> Self {
        self.sts_timeout = timeout;
        self
    }

    /// Remembers a failed call per session for `ttl` (kube2iam's `--iam-role-error-ttl`): callers get
    /// its error without a new STS call until then. Zero (the default) remembers nothing.
    pub fn with_error_ttl(mut self, ttl: Duration) -> Self {
        self.error_ttl = ttl;
        self
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// Credentials for `session`: the cached set when it is fit to serve; else, at once, a cached set of
    /// the same session with a few minutes left while a fresh one is fetched behind it; else a fresh one,
    /// waiting at most the STS timeout. One STS call at a time however many callers ask; the call runs
    /// on its own, so a caller that gives up does not cancel it.
    pub async fn get(self: &Arc<Self>, session: &SessionKey) -> Result<Arc<Credentials>, StsError> {
        let slot = self.slot(session);
        let now = self.timing.now();
        slot.touch(now);
        let lookup = self.lookup(session, &slot, now);
        self.metrics.lookup(lookup.result());
        match lookup {
            Lookup::Hit(creds) | Lookup::Stale(creds) => Ok(creds),
            Lookup::Miss(flight) => flight.landed(session).await,
            Lookup::Failed(err) => Err(err),
        }
    }

    /// What `slot` holds for a request at `now`; starts a call unless the set is fit or a call is in
    /// flight.
    fn lookup(self: &Arc<Self>, session: &SessionKey, slot: &Arc<Slot>, now: SystemTime) -> Lookup {
        let mut state = slot.state();
        let current = state.current.as_ref().map(|held| held.set.clone());
        if let Some(creds) = current.as_ref().filter(|creds| fit_to_serve(creds, now)) {
            return Lookup::Hit(creds.clone());
        }
        let stale = current.filter(|creds| creds.remaining(now) >= LAST_RESORT_REMAINING);
        let flight = match (state.flight(), state.remembered_failure(now)) {
            (Some(flight), _) => flight,
            (None, Some(failure)) => return stale.map_or(Lookup::Failed(failure), Lookup::Stale),
            (None, None) => self.start_flight(session, slot, &mut state),
        };
        match stale {
            Some(creds) => Lookup::Stale(creds),
            None => Lookup::Miss(flight),
        }
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Refreshes every session due for it, up to [`MAX_CONCURRENT_REFRESHES`] at a time, and drops those
    /// nobody asked for in two session lifetimes. Returns once every refresh it started has landed, each
    /// within the STS timeout.
    pub async fn refresh_due(self: &Arc<Self>) {
        let now = self.timing.now();
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REFRESHES));
        let mut refreshes = JoinSet::new();
        for (session, slot) in self.drop_idle(now) {
            if !slot.refresh_due(now) {
                continue;
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break; // only a closed semaphore refuses, and nothing closes this one
            };
            let Some(flight) = self.start_refresh(&session, &slot) else {
                continue; // a request's call for this session is in flight
            };
            let metrics = self.metrics.clone();
            refreshes.spawn(async move {
                let fetched = flight.landed(&session).await;
                drop(permit);
                metrics.refresh(fetched.is_ok());
            });
        }
        while refreshes.join_next().await.is_some() {}
    }

    /// Runs [`Self::refresh_due`] every `interval` while the cache lives.
    pub fn spawn_refresher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        crate::periodic::every(interval, self, |cache| async move { cache.refresh_due().await })
    }

    /// Drops the sessions nobody asked for in two session lifetimes, and returns those kept.
    fn drop_idle(&self, now: SystemTime) -> Vec<(SessionKey, Arc<Slot>)> {
        let idle_limit = self.session_duration * 2;
        let mut slots = self.lock();
        slots.retain(|_, slot| {
            slot.last_used()
                .is_some_and(|used| now.duration_since(used).unwrap_or_default() < idle_limit)
        });
        self.metrics.sessions(slots.len());
        slots
            .iter()
            .map(|(key, slot)| (key.clone(), slot.clone()))
            .collect()
    }

    /// Starts a call for `session` unless one is in flight, its failure is remembered, or its last
    /// failure's retry delay has not passed.
    fn start_refresh(self: &Arc<Self>, session: &SessionKey, slot: &Arc<Slot>) -> Option<Flight> {
        let mut state = slot.state();
        let backing_off = state
            .failure
            .as_ref()
            .is_some_and(|failure| tokio::time::Instant::now() < failure.refresh_not_before);
        if state.flight().is_some() || state.remembered_failure(self.timing.now()).is_some() || backing_off {
            return None;
        }
        Some(self.start_flight(session, slot, &mut state))
    }

    /// Starts a call for `session` as a task of its own, which lands its answer in `slot` whoever is
    /// still waiting for it.
    fn start_flight(
        self: &Arc<Self>,
        session: &SessionKey,
        slot: &Arc<Slot>,
        state: &mut SlotState,
    ) -> Flight {
        let (land, landed) = watch::channel(None);
        let flight = Flight(landed);
        state.in_flight = Some(flight.clone());
        let (cache, session, slot) = (self.clone(), session.clone(), slot.clone());
        tokio::spawn(async move {
            let fetched = cache.assume_role(&session).await;
            slot.land(&fetched, cache.error_ttl, cache.timing.as_ref());
            land.send_replace(Some(fetched));
        });
        flight
    }

    /// One AssumeRole call, bounded by the STS timeout, counted and logged.
    async fn assume_role(&self, session: &SessionKey) -> Fetched {
        let started = tokio::time::Instant::now();
        let call = self.sts.assume_role(session, self.session_duration);
        let fetched = match tokio::time::timeout(self.sts_timeout, call).await {
            Ok(answer) => answer.map(Arc::new),
            Err(_) => Err(StsError::TimedOut {
                role: session.role.to_string(),
                after: self.sts_timeout,
            }),
        };
        self.metrics
            .sts_call(session.role.as_str(), StsResult::of(&fetched), started.elapsed());
        match &fetched {
            Ok(_) => {
                tracing::info!(role = %session.role, session_name = session.session_name.as_str(), tags = %session.tags, "assumed role");
            }
            Err(err) => tracing::warn!(role = %session.role, error = %err, "STS AssumeRole failed"),
        }
        fetched
    }

    fn slot(&self, session: &SessionKey) -> Arc<Slot> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(session) {
            return slot.clone();
        }
        if slots.len() >= self.max_sessions {
            evict_least_recently_used(&mut slots);
        }
        let slot = slots.entry(session.clone()).or_default().clone();
        self.metrics.sessions(slots.len());
        slot
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SessionKey, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn evict_least_recently_used(slots: &mut HashMap<SessionKey, Arc<Slot>>) {
    let oldest = slots
        .iter()
        .min_by_key(|(_, slot)| slot.last_used())
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        slots.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashSet},
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use prometheus_client::registry::Registry;
    use tokio::time::Instant;

    use super::*;
    use crate::policy::{RoleArn, SessionName};

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);
    const SECOND: Duration = Duration::from_secs(1);
    const MILLISECOND: Duration = Duration::from_millis(1);

    fn creds(issued: SystemTime, lifetime: Duration) -> Credentials {
        Credentials {
            access_key_id: "ASIATEST".to_owned(),
            secret_access_key: Secret::new("secret".to_owned()),
            session_token: Secret::new("token".to_owned()),
            issued,
            expiration: issued + lifetime,
            documents: Documents::default(),
        }
    }

    fn session(role: &str) -> SessionKey {
        SessionKey {
            role: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{role}")).unwrap(),
            external_id: None,
            session_name: SessionName::sanitize("test"),
            tags: SessionTags::default(),
        }
    }

    /// Timing for tests on tokio's paused clock: the time of day follows it from a fixed origin, so
    /// that `tokio::time::advance` ages sets too, and draws come from a fixed sequence, or are all zero,
    /// which is the schedule without jitter.
    pub(super) struct PausedTiming {
        origin: SystemTime,
        started: Instant,
        draws: Draws,
    }

    enum Draws {
        Zero,
        /// SplitMix64's state.
        Seeded(Mutex<u64>),
    }

    impl PausedTiming {
        pub(super) fn seeded(seed: u64) -> Arc<Self> {
            Self::new(Draws::Seeded(Mutex::new(seed)))
        }

        pub(super) fn without_jitter() -> Arc<Self> {
            Self::new(Draws::Zero)
        }

        fn new(draws: Draws) -> Arc<Self> {
            Arc::new(Self {
                origin: SystemTime::UNIX_EPOCH,
                started: Instant::now(),
                draws,
            })
        }

        /// Time on tokio's clock since this timing was made.
        pub(super) fn elapsed(&self) -> Duration {
            self.started.elapsed()
        }
    }

    impl Timing for PausedTiming {
        fn now(&self) -> SystemTime {
            self.origin + self.elapsed()
        }

        fn random_fraction(&self) -> f64 {
            let Draws::Seeded(state) = &self.draws else {
                return 0.0;
            };
            let mut state = state.lock().unwrap();
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // The top 53 bits, as many as an f64 holds exactly.
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Counts calls; answers with sets of the given lifetime named after the call (`ASIA0`, `ASIA1`...),
    /// after `delay` when one is set, fails while `fail` is set, and never answers for the roles in `hung`.
    struct FakeSts {
        calls: watch::Sender<usize>,
        lifetime: Duration,
        delay: Mutex<Option<Duration>>,
        fail: AtomicBool,
        hung: Mutex<HashSet<String>>,
        running: AtomicUsize,
        most_running: AtomicUsize,
    }

    impl FakeSts {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                calls: watch::Sender::new(0),
                lifetime,
                delay: Mutex::default(),
                fail: false.into(),
                hung: Mutex::default(),
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
            })
        }

        /// From now on, calls answer only after `delay`.
        fn answer_after(&self, delay: Duration) {
            *self.delay.lock().unwrap() = Some(delay);
        }

        /// From now on, calls for `role` never answer: a pending future, so that a paused clock moves
        /// on to the call's timeout.
        fn hang(&self, role: &str) {
            self.hung.lock().unwrap().insert(role.to_owned());
        }

        fn calls(&self) -> usize {
            *self.calls.borrow()
        }

        /// Waits until `count` calls have started; fails, rather than hangs, when they never do.
        async fn started(&self, count: usize) {
            let mut calls = self.calls.subscribe();
            let started = calls.wait_for(|calls| *calls >= count);
            tokio::time::timeout(5 * SECOND, started)
                .await
                .expect("the calls never started")
                .unwrap();
        }
    }

    /// Counts a call as running until it ends, answered or dropped by its timeout.
    struct Running<'a>(&'a AtomicUsize);

    impl<'a> Running<'a> {
        fn start(sts: &'a FakeSts) -> Self {
            let now = sts.running.fetch_add(1, Ordering::SeqCst) + 1;
            sts.most_running.fetch_max(now, Ordering::SeqCst);
            Self(&sts.running)
        }
    }

    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl AssumeRole for FakeSts {
        async fn assume_role(&self, session: &SessionKey, _: Duration) -> Result<Credentials, StsError> {
            let mut n = 0;
            self.calls.send_modify(|calls| {
                n = *calls;
                *calls += 1;
            });
            let _running = Running::start(self);
            // Long enough that every concurrent caller is waiting when the call returns.
            tokio::task::yield_now().await;
            let delay = *self.delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if self.hung.lock().unwrap().contains(session.role.name()) {
                std::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(StsError::Failed {
                    role: session.role.to_string(),
                    message: "down".to_owned(),
                });
            }
            let mut set = creds(SystemTime::now(), self.lifetime);
            set.access_key_id = format!("ASIA{n}");
            Ok(set)
        }
    }

    /// A cache with the agent's own STS timeout: the tests that wait for it run on a paused clock.
    fn cache(sts: &Arc<FakeSts>) -> Arc<CredentialCache> {
        Arc::new(CredentialCache::new(sts.clone(), sts.lifetime, 100))
    }

    /// Puts `set` in `session`'s slot as if a call had brought it, to be refreshed at the latest point
    /// of its window, and marks the session used now.
    fn put(cache: &CredentialCache, session: &SessionKey, set: Credentials) {
        let slot = cache.slot(session);
        slot.touch(SystemTime::now());
        slot.state().current = Some(Held::new(Arc::new(set), 0.0));
    }

    fn key_of(cache: &CredentialCache, session: &SessionKey) -> Option<String> {
        let slot = cache.slot(session);
        let state = slot.state();
        Some(state.current.as_ref()?.set.access_key_id.clone())
    }

    /// The answer of the call in flight for `session`.
    async fn landed(cache: &CredentialCache, session: &SessionKey) -> Fetched {
        let flight = cache.slot(session).state().flight().expect("a call in flight");
        flight.landed(session).await
    }

    /// The value of one counter or gauge sample, as Prometheus would scrape it.
    fn metric(cache: &CredentialCache, sample: &str) -> Option<f64> {
        let mut registry = Registry::default();
        cache.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    fn sts_calls(role: &str, result: &str) -> String {
        format!("sts_assume_role_total{{role=\"arn:aws:iam::123456789012:role/{role}\",result=\"{result}\"}}")
    }

    #[test]
    fn fit_to_serve_needs_twenty_minutes() {
        let now = SystemTime::now();
        assert!(fit_to_serve(&creds(now, HOUR), now));
        assert!(fit_to_serve(&creds(now - 40 * MINUTE, HOUR), now));
        assert!(!fit_to_serve(&creds(now - 41 * MINUTE, HOUR), now));
        // A 15-minute session is fit while two thirds of it (10 minutes) remain.
        assert!(fit_to_serve(&creds(now - 5 * MINUTE, 15 * MINUTE), now));
        assert!(!fit_to_serve(&creds(now - 6 * MINUTE, 15 * MINUTE), now));
    }

    /// The refresh window of a set of `lifetime`, as times after its issue.
    fn window_after_issue(lifetime: Duration) -> (Duration, Duration) {
        let issued = SystemTime::UNIX_EPOCH;
        let window = RefreshWindow::of(&creds(issued, lifetime));
        let after_issue = |at: SystemTime| at.duration_since(issued).unwrap();
        (after_issue(window.earliest), after_issue(window.latest))
    }

    #[test]
    fn refresh_comes_by_halfway_and_before_the_set_turns_unfit_up_to_a_quarter_earlier() {
        // One hour: unfit at 40 minutes; halfway comes first, and a quarter earlier is 22.5 minutes.
        assert_eq!(window_after_issue(HOUR), (22 * MINUTE + 30 * SECOND, 30 * MINUTE));
        // 12 hours: unfit at 11h40m, so halfway (6h) comes first; a quarter earlier (4.5h) would be
        // before halfway through the time it is fit (5h50m), the floor.
        assert_eq!(window_after_issue(12 * HOUR), (5 * HOUR + 50 * MINUTE, 6 * HOUR));
        // 45 minutes: unfit at 25 minutes, 5 minutes before that comes before halfway (22.5).
        assert_eq!(window_after_issue(45 * MINUTE), (15 * MINUTE, 20 * MINUTE));
        // 30 minutes: unfit at 10 minutes (two thirds remain = 20); the floor, 5 minutes, leaves no span.
        assert_eq!(window_after_issue(30 * MINUTE), (5 * MINUTE, 5 * MINUTE));
    }

    #[test]
    fn every_draw_refreshes_a_set_within_its_window_while_it_is_fit_and_not_before_the_floor() {
        for lifetime in [15 * MINUTE, 30 * MINUTE, 45 * MINUTE, HOUR, 12 * HOUR] {
            let set = creds(SystemTime::UNIX_EPOCH, lifetime);
            let window = RefreshWindow::of(&set);
            assert_eq!(
                window.at(0.0),
                window.latest,
                "a draw of 0 is the schedule without jitter"
            );
            let floor = set.issued + set.fit_for() / 2;
            for random in [0.0, 0.25, 0.5, 0.999, 1.0, -1.0, 2.0] {
                let at = window.at(random);
                assert!(
                    (window.earliest..=window.latest).contains(&at),
                    "{lifetime:?} {random}"
                );
                assert!(at >= floor, "{lifetime:?} refreshed before the floor");
                assert!(fit_to_serve(&set, at), "{lifetime:?} unfit at its refresh point");
            }
        }
    }

    /// When `count` sets of an hour, all issued at one moment, come due, drawing from `timing`: how
    /// many at each 15-second check of the background task, by the check's time after their issue.
    fn due_per_check(count: usize, timing: &PausedTiming) -> BTreeMap<Duration, usize> {
        let check = REFRESH_CHECK.as_secs();
        let issued = SystemTime::UNIX_EPOCH;
        let set: Fetched = Ok(Arc::new(creds(issued, HOUR)));
        let mut due = BTreeMap::new();
        for _ in 0..count {
            let slot = Slot::default();
            slot.land(&set, Duration::ZERO, timing);
            let refresh_at = slot.state().current.as_ref().unwrap().refresh_at;
            let after_issue = refresh_at.duration_since(issued).unwrap().as_secs();
            *due.entry(Duration::from_secs(after_issue.div_ceil(check) * check))
                .or_insert(0) += 1;
        }
        due
    }

    #[test]
    fn sets_issued_together_come_due_spread_over_their_window_not_at_one_check() {
        let without_jitter = due_per_check(110, &PausedTiming::without_jitter());
        assert_eq!(without_jitter, BTreeMap::from([(30 * MINUTE, 110)]));
        let jittered = due_per_check(110, &PausedTiming::seeded(1));
        let (first, last) = (jittered.keys().next().unwrap(), jittered.keys().last().unwrap());
        assert!(
            *first >= 22 * MINUTE + 30 * SECOND && *last <= 30 * MINUTE,
            "{jittered:?}"
        );
        // 31 checks in 7.5 minutes, 3.5 sets each on average.
        assert!(jittered.len() >= 25, "{} checks: {jittered:?}", jittered.len());
        assert!(jittered.values().all(|&due| due <= 10), "{jittered:?}");
    }

    #[test]
    fn a_fifteen_minute_set_is_refreshed_halfway_through_the_five_minutes_it_is_fit() {
        let issued = SystemTime::UNIX_EPOCH;
        let set = creds(issued, 15 * MINUTE);
        let refresh_at = issued + 2 * MINUTE + 30 * SECOND;
        let window = RefreshWindow::of(&set);
        assert_eq!(
            (window.earliest, window.latest),
            (refresh_at, refresh_at),
            "no span to jitter"
        );
        // Fit until 5 minutes in: 2.5 minutes for the refresh to land, many 15-second checks.
        assert!(fit_to_serve(&set, refresh_at));
        assert!(fit_to_serve(&set, refresh_at + 2 * MINUTE + 30 * SECOND));
        assert!(!fit_to_serve(&set, refresh_at + 2 * MINUTE + 31 * SECOND));
    }

    #[tokio::test]
    async fn a_fifteen_minute_session_is_refreshed_once_and_served_fit_until_then() {
        let sts = FakeSts::new(15 * MINUTE);
        let cache = cache(&sts);
        let key = session("short");
        put(
            &cache,
            &key,
            creds(SystemTime::now() - 2 * MINUTE - 29 * SECOND, 15 * MINUTE),
        );
        cache.refresh_due().await;
        assert_eq!(sts.calls(), 0, "refreshed before its time");

        put(
            &cache,
            &key,
            creds(SystemTime::now() - 2 * MINUTE - 30 * SECOND, 15 * MINUTE),
        );
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIATEST");
        assert_eq!(
            metric(&cache, "credential_cache_lookups_total{result=\"hit\"}"),
            Some(1.0)
        );
        cache.refresh_due().await;
        assert_eq!(sts.calls(), 1);
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIA0");
        cache.refresh_due().await;
        cache.refresh_due().await;
        assert_eq!(sts.calls(), 1, "the fresh set was refreshed again at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_requests_make_one_sts_call() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&session("app")).await.unwrap().access_key_id.clone() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "ASIA0");
        }
        assert_eq!(sts.calls(), 1);
        cache.get(&session("other")).await.unwrap();
        assert_eq!(sts.calls(), 2, "another role is another session");
    }

    #[tokio::test(start_paused = true)]
    async fn sts_failure_without_a_usable_set_is_an_error_remembered_only_while_requests_back_off() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = cache(&sts);
        let err = cache.get(&session("app")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "STS AssumeRole of arn:aws:iam::123456789012:role/app failed: down"
        );
        assert_eq!(metric(&cache, &sts_calls("app", "error")), Some(1.0));
        sts.fail.store(false, Ordering::SeqCst);
        // Within the first wait (1/2 to 1 of 250 ms), the failure is the answer, without a call.
        assert!(cache.get(&session("app")).await.is_err());
        assert_eq!(sts.calls(), 1);
        tokio::time::advance(REQUEST_RETRY_FIRST).await;
        assert_eq!(cache.get(&session("app")).await.unwrap().access_key_id, "ASIA1");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_asking_without_pause_while_sts_fails_call_about_once_a_second() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = cache(&sts);
        let app = session("app");
        // A pod asking every 10 ms for a minute: 6,000 requests.
        for _ in 0..6000 {
            assert!(cache.get(&app).await.is_err());
            tokio::time::advance(10 * MILLISECOND).await;
        }
        // The waits double to 2 s, each 1/2 to 1 of that: 30 to 60 calls, and a few on the way there.
        let calls = sts.calls();
        assert!((30..=66).contains(&calls), "{calls} calls in a minute");
        // STS is back: a request calls again within the longest wait.
        sts.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(REQUEST_RETRY_LAST).await;
        assert!(cache.get(&app).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn with_an_error_ttl_a_failure_is_answered_again_without_a_call_until_it_ends() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = Arc::new(CredentialCache::new(sts.clone(), HOUR, 100).with_error_ttl(30 * SECOND));
        assert!(cache.get(&session("app")).await.is_err());
        sts.fail.store(false, Ordering::SeqCst);
        let remembered = cache.get(&session("app")).await.unwrap_err();
        assert!(remembered.to_string().ends_with("failed: down"), "{remembered}");
        assert_eq!(sts.calls(), 1, "no call while the failure is remembered");
        cache.refresh_due().await;
        assert_eq!(sts.calls(), 1, "nor from the refresher");
        assert!(
            cache.get(&session("other")).await.is_ok(),
            "another session is another key"
        );
        // SystemTime does not follow tokio's paused clock: end the TTL by rewriting the slot's deadline.
        let slot = cache.slot(&session("app"));
        slot.state().failure.as_mut().unwrap().remembered_until = SystemTime::now();
        tokio::time::advance(REQUEST_RETRY_FIRST).await;
        assert_eq!(cache.get(&session("app")).await.unwrap().access_key_id, "ASIA2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_past_fit_is_served_at_once_while_it_has_five_minutes_left() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = cache(&sts);
        let key = session("app");
        // Not fit to serve, but 10 minutes left: served, and a call started behind it.
        put(&cache, &key, creds(SystemTime::now() - 50 * MINUTE, HOUR));
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIATEST");
        assert_eq!(
            metric(&cache, "credential_cache_lookups_total{result=\"stale\"}"),
            Some(1.0)
        );
        assert!(landed(&cache, &key).await.is_err());
        assert_eq!(sts.calls(), 1);
        // 4 minutes left: once the requests' backoff ends, the request waits for STS, and STS's error
        // is the answer.
        tokio::time::advance(REQUEST_RETRY_FIRST).await;
        put(&cache, &key, creds(SystemTime::now() - 56 * MINUTE, HOUR));
        assert!(cache.get(&key).await.is_err());
        assert_eq!(
            metric(&cache, "credential_cache_lookups_total{result=\"miss\"}"),
            Some(1.0)
        );
        assert_eq!(sts.calls(), 2);
        // Once STS answers again (and the backoff ended), the set it brought replaces the stale one.
        sts.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(REQUEST_RETRY_LAST).await;
        put(&cache, &key, creds(SystemTime::now() - 50 * MINUTE, HOUR));
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIATEST");
        assert_eq!(landed(&cache, &key).await.unwrap().access_key_id, "ASIA2");
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIA2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_gives_up_leaves_its_call_to_land_in_the_cache() {
        const BOTOCORE_TIMEOUT: Duration = SECOND;
        let slow = BOTOCORE_TIMEOUT + Duration::from_millis(500);
        assert!(slow < STS_CALL_TIMEOUT);
        let sts = FakeSts::new(HOUR);
        sts.answer_after(slow);
        let cache = cache(&sts);
        let key = session("app");
        // The caller's own timeout ends first and drops the request, not the call it started.
        let started = Instant::now();
        let gave_up = tokio::time::timeout(BOTOCORE_TIMEOUT, cache.get(&key)).await;
        assert!(gave_up.is_err());
        assert_eq!(started.elapsed(), BOTOCORE_TIMEOUT);
        assert_eq!(landed(&cache, &key).await.unwrap().access_key_id, "ASIA0");
        assert_eq!(started.elapsed(), slow);
        // The caller's retry finds the set in the cache.
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIA0");
        assert_eq!(started.elapsed(), slow);
        assert_eq!(sts.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn while_sts_hangs_a_cached_set_is_served_at_once_and_a_new_session_times_out() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let (cached, new) = (session("cached"), session("new"));
        put(&cache, &cached, creds(SystemTime::now() - 50 * MINUTE, HOUR));
        sts.hang("cached");
        sts.hang("new");

        // The cached set, past fit, is served without waiting for the call it starts.
        let started = Instant::now();
        for _ in 0..10 {
            assert_eq!(cache.get(&cached).await.unwrap().access_key_id, "ASIATEST");
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        sts.started(1).await;
        assert_eq!(sts.calls(), 1, "one call in flight for the session");
        assert_eq!(
            metric(&cache, "credential_cache_lookups_total{result=\"stale\"}"),
            Some(10.0)
        );

        // A session with no set waits for its call, and hears the timeout when it comes.
        let err = cache.get(&new).await.unwrap_err();
        assert_eq!(started.elapsed(), STS_CALL_TIMEOUT);
        assert!(
            matches!(err, StsError::TimedOut { after, .. } if after == STS_CALL_TIMEOUT),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "STS AssumeRole of arn:aws:iam::123456789012:role/new timed out: no answer within 2s"
        );
        assert_eq!(metric(&cache, &sts_calls("new", "timeout")), Some(1.0));
        assert_eq!(
            metric(
                &cache,
                "sts_assume_role_duration_seconds_sum{role=\"arn:aws:iam::123456789012:role/new\"}"
            ),
            Some(STS_CALL_TIMEOUT.as_secs_f64()),
            "a timed-out call counts its timeout"
        );
        assert_eq!(metric(&cache, &sts_calls("new", "error")), None);
        assert_eq!(metric(&cache, &sts_calls("cached", "timeout")), Some(1.0));
        assert_eq!(
            sts.running.load(Ordering::SeqCst),
            0,
            "a timed-out call still runs"
        );

        // Its set still has minutes left, so the cached session is served as before: at once.
        let started = Instant::now();
        assert_eq!(cache.get(&cached).await.unwrap().access_key_id, "ASIATEST");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn background_refresh_replaces_due_sets_and_drops_idle_sessions() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let (due, idle) = (session("due"), session("idle"));
        cache.get(&due).await.unwrap();
        cache.get(&idle).await.unwrap();
        put(&cache, &due, creds(SystemTime::now() - 31 * MINUTE, HOUR));
        *cache.slot(&idle).last_used.lock().unwrap() = Some(SystemTime::now() - 3 * HOUR);
        cache.refresh_due().await;
        assert_eq!(cache.len(), 1);
        assert_eq!(metric(&cache, "credential_sessions"), Some(1.0));
        assert_eq!(sts.calls(), 3, "only the due session was refreshed");
        assert_eq!(
            metric(&cache, "credential_refreshes_total{result=\"success\"}"),
            Some(1.0)
        );
        assert_eq!(cache.get(&due).await.unwrap().access_key_id, "ASIA2");
    }

    #[tokio::test(start_paused = true)]
    async fn hung_refreshes_stall_no_other_session() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let hung = ["hung1", "hung2", "hung3", "hung4"];
        let answered = session("answered");
        for role in hung {
            sts.hang(role);
            put(
                &cache,
                &session(role),
                creds(SystemTime::now() - 31 * MINUTE, HOUR),
            );
        }
        put(&cache, &answered, creds(SystemTime::now() - 31 * MINUTE, HOUR));

        let started = Instant::now();
        let refresh = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh_due().await }
        });
        sts.started(5).await;
        // The answered session's set lands while the other four calls hang.
        assert!(landed(&cache, &answered).await.is_ok());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_ne!(key_of(&cache, &answered).unwrap(), "ASIATEST");
        assert_eq!(sts.running.load(Ordering::SeqCst), 4);
        refresh.await.unwrap();
        // One after another, four hung calls would take four timeouts.
        assert_eq!(started.elapsed(), STS_CALL_TIMEOUT);
        for role in hung {
            assert_eq!(metric(&cache, &sts_calls(role, "timeout")), Some(1.0));
            assert_eq!(key_of(&cache, &session(role)).unwrap(), "ASIATEST");
        }
        assert_eq!(
            metric(&cache, "credential_refreshes_total{result=\"success\"}"),
            Some(1.0)
        );
        assert_eq!(
            metric(&cache, "credential_refreshes_total{result=\"error\"}"),
            Some(4.0)
        );
    }

    #[test]
    fn retries_wait_twice_as_long_after_each_failure_up_to_ten_minutes_scaled_by_jitter() {
        let delays: Vec<Duration> = (1..=8).map(retry_delay).collect();
        assert_eq!(
            delays,
            [15, 30, 60, 120, 240, 480, 600, 600].map(Duration::from_secs)
        );
        assert_eq!(retry_delay(u32::MAX), RETRY_LAST);
        assert_eq!(jittered(60 * SECOND, 0.0), 30 * SECOND);
        assert_eq!(jittered(60 * SECOND, 0.5), 45 * SECOND);
        assert!(jittered(60 * SECOND, random_fraction()) < 60 * SECOND);
    }

    /// The background task's calls for a session whose calls fail (STS down, the role not assumable),
    /// one check every 15 s as the agent runs it, over `checks` checks.
    async fn background_calls_while_failing(
        sts: &Arc<FakeSts>,
        cache: &Arc<CredentialCache>,
        checks: u32,
    ) -> usize {
        let before = sts.calls();
        for _ in 0..checks {
            cache.refresh_due().await;
            tokio::time::advance(15 * SECOND).await;
        }
        sts.calls() - before
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_session_is_retried_in_the_background_with_backoff_not_on_every_check() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = cache(&sts);
        let app = session("app");
        // A pod asked once and its call failed: the session has no set.
        assert!(cache.get(&app).await.is_err());
        assert_eq!(sts.calls(), 1);
        // Within the first retry's wait (at least 7.5 s), the background task does not call.
        cache.refresh_due().await;
        tokio::time::advance(7 * SECOND).await;
        cache.refresh_due().await;
        assert_eq!(sts.calls(), 1);
        // Over an hour of checks: the waits double to 10 minutes (each 1/2 to 1 of that), so 10 to 17
        // calls, where a call on every check would be 240.
        let calls = background_calls_while_failing(&sts, &cache, 240).await;
        assert!((10..=17).contains(&calls), "{calls} calls in an hour");
        // A request still calls when its pod asks: one call, not held back by the background's wait.
        assert!(cache.get(&app).await.is_err());
        assert_eq!(sts.calls(), 1 + calls + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_backoff() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = cache(&sts);
        let app = session("app");
        assert!(cache.get(&app).await.is_err());
        background_calls_while_failing(&sts, &cache, 240).await;
        sts.fail.store(false, Ordering::SeqCst);
        assert!(cache.get(&app).await.is_ok());
        assert!(cache.slot(&app).state().failure.is_none());
        // The next failure waits the first delay again, not ten minutes.
        sts.fail.store(true, Ordering::SeqCst);
        cache.slot(&app).state().current = None;
        assert!(cache.get(&app).await.is_err());
        let slot = cache.slot(&app);
        let state = slot.state();
        let failure = state.failure.as_ref().expect("a failure is kept");
        assert_eq!(failure.in_a_row, 1);
        assert!(failure.refresh_not_before <= tokio::time::Instant::now() + RETRY_FIRST);
    }

    /// 20 sessions whose first calls failed together, drawing their waits from `timing`, with STS
    /// still failing: the most background calls one check makes in the second half hour.
    async fn most_retries_at_one_check(timing: Arc<PausedTiming>) -> usize {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = Arc::new(CredentialCache::new(sts.clone(), HOUR, 100).with_timing(timing));
        for n in 0..20 {
            assert!(cache.get(&session(&format!("app{n}"))).await.is_err());
        }
        let mut most = 0;
        for check in 0..240 {
            let before = sts.calls();
            cache.refresh_due().await;
            if check >= 120 {
                most = most.max(sts.calls() - before);
            }
            tokio::time::advance(REFRESH_CHECK).await;
        }
        most
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_that_failed_together_are_retried_at_different_checks() {
        // Without jitter every wait would be the same, and the 20 would retry together for ever.
        assert_eq!(
            most_retries_at_one_check(PausedTiming::without_jitter()).await,
            20
        );
        let most = most_retries_at_one_check(PausedTiming::seeded(1)).await;
        assert!(most <= 5, "{most} of 20 sessions retried at one check");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_requests_while_sts_refuses_makes_one_call_and_all_hear_its_answer() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        sts.answer_after(100 * Duration::from_millis(1));
        let cache = cache(&sts);
        let burst: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&session("app")).await })
            })
            .collect();
        for request in burst {
            let err = request.await.unwrap().unwrap_err();
            assert!(err.to_string().ends_with("failed: down"), "{err}");
        }
        assert_eq!(sts.calls(), 1);
        assert_eq!(sts.most_running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn background_refreshes_call_sts_a_bounded_number_at_a_time() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let due = 2 * MAX_CONCURRENT_REFRESHES;
        for n in 0..due {
            let role = format!("hung{n}");
            sts.hang(&role);
            put(
                &cache,
                &session(&role),
                creds(SystemTime::now() - 31 * MINUTE, HOUR),
            );
        }
        let started = Instant::now();
        cache.refresh_due().await;
        assert_eq!(sts.calls(), due);
        assert_eq!(sts.most_running.load(Ordering::SeqCst), MAX_CONCURRENT_REFRESHES);
        // Two rounds of hung calls: all at once would take one timeout, fewer at a time more than two.
        assert_eq!(started.elapsed(), 2 * STS_CALL_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_joins_no_call_already_in_flight() {
        let sts = FakeSts::new(HOUR);
        let cache = cache(&sts);
        let key = session("app");
        sts.hang("app");
        put(&cache, &key, creds(SystemTime::now() - 50 * MINUTE, HOUR));
        cache.get(&key).await.unwrap();
        sts.started(1).await;
        // Were it to start a call, or wait on the one in flight, it would return at the timeout.
        let started = Instant::now();
        cache.refresh_due().await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(sts.calls(), 1, "a second call for one session");
        assert_eq!(
            metric(&cache, "credential_refreshes_total{result=\"error\"}"),
            None
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let cache = Arc::new(CredentialCache::new(FakeSts::new(HOUR), HOUR, 2));
        for role in ["a", "b", "c"] {
            cache.get(&session(role)).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let text = format!("{:?}", creds(SystemTime::UNIX_EPOCH, HOUR));
        assert!(
            !text.contains("\"secret\"") && !text.contains("\"token\""),
            "{text}"
        );
    }
}
