//! creds: temporary credentials for each session ([`SessionKey`]), from STS AssumeRole signed with the
//! agent's own credentials. The cache makes one STS call per key however many callers wait, refreshes
//! sessions in the background well before they expire, and never serves a set with less than 20
//! minutes left when a fresh one can be had.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

pub mod metrics;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use tokio::sync::Mutex as AsyncMutex;

pub use self::metrics::CacheMetrics;
use crate::policy::SessionKey;

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub issued: SystemTime,
    pub expiration: SystemTime,
}

impl Credentials {
    fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration.duration_since(now).unwrap_or_default()
    }

    fn lifetime(&self) -> Duration {
        self.expiration.duration_since(self.issued).unwrap_or_default()
    }
}

/// botocore refreshes credentials with less than 15 minutes left (10 mandatory); serving fewer than 20
/// makes it call again at once.
pub const MIN_REMAINING: Duration = Duration::from_secs(20 * 60);

/// Whether a set is fit to serve: at least [`MIN_REMAINING`] left, or two thirds of its lifetime for
/// sessions too short to ever have 20 minutes.
pub fn fit_to_serve(creds: &Credentials, now: SystemTime) -> bool {
    creds.remaining(now) >= MIN_REMAINING.min(creds.lifetime() * 2 / 3)
}

/// When the background task replaces a set: halfway through its life, and never later than five
/// minutes before it stops being fit to serve.
pub fn refresh_at(creds: &Credentials) -> SystemTime {
    let lifetime = creds.lifetime();
    let unfit_at = creds.expiration - MIN_REMAINING.min(lifetime * 2 / 3);
    let halfway = creds.issued + lifetime / 2;
    halfway.min(
        unfit_at
            .checked_sub(Duration::from_secs(5 * 60))
            .unwrap_or(creds.issued),
    )
}

/// A set too close to expiry to serve normally may still be served when STS fails, if it has this much
/// left: it is the caller's own session, and better than an error.
const LAST_RESORT_REMAINING: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug, thiserror::Error)]
#[error("STS AssumeRole of {role} failed: {message}")]
pub struct StsError {
    pub role: String,
    pub message: String,
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

#[async_trait::async_trait]
impl AssumeRole for StsAssumeRole {
    async fn assume_role(&self, session: &SessionKey, duration: Duration) -> Result<Credentials, StsError> {
        let failed = |message: String| StsError {
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
            .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|err| failed(aws_sdk_sts::error::DisplayErrorContext(err).to_string()))?;
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
        })
    }
}

/// One session's slot: the current set, and the lock that lets one fetch run at a time.
#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Credentials>>>,
    fetch: AsyncMutex<()>,
    last_used: Mutex<Option<SystemTime>>,
}

impl Slot {
    fn current(&self) -> Option<Arc<Credentials>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn touch(&self, now: SystemTime) {
        *self.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
    }
}

/// Credentials by session, shared by every request.
pub struct CredentialCache {
    sts: Arc<dyn AssumeRole>,
    session_duration: Duration,
    max_sessions: usize,
    slots: Mutex<HashMap<SessionKey, Arc<Slot>>>,
    metrics: CacheMetrics,
}

impl CredentialCache {
    pub fn new(sts: Arc<dyn AssumeRole>, session_duration: Duration, max_sessions: usize) -> Self {
        Self {
            sts,
            session_duration,
            max_sessions,
            slots: Mutex::new(HashMap::new()),
            metrics: CacheMetrics::default(),
        }
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// Credentials for `session`: the cached set when it is fit to serve, else a fresh one (one STS call
    /// however many callers ask at once). On STS failure a cached set of the same session with a few
    /// minutes left is served rather than nothing; never anything else.
    pub async fn get(&self, session: &SessionKey) -> Result<Arc<Credentials>, StsError> {
        let slot = self.slot(session);
        let now = SystemTime::now();
        slot.touch(now);
        if let Some(creds) = slot.current().filter(|creds| fit_to_serve(creds, now)) {
            self.metrics.lookup(true);
            return Ok(creds);
        }
        self.metrics.lookup(false);
        let _fetching = slot.fetch.lock().await;
        // Whoever held the lock before us may have fetched a fresh set.
        if let Some(creds) = slot
            .current()
            .filter(|creds| fit_to_serve(creds, SystemTime::now()))
        {
            return Ok(creds);
        }
        match self.fetch(session, &slot).await {
            Ok(creds) => Ok(creds),
            Err(err) => match slot.current() {
                Some(creds) if creds.remaining(SystemTime::now()) >= LAST_RESORT_REMAINING => {
                    tracing::warn!(role = %session.role, error = %err, "STS failed; serving this session's cached credentials");
                    Ok(creds)
                }
                _ => Err(err),
            },
        }
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Refreshes every session due for it and drops those nobody asked for in two session lifetimes.
    pub async fn refresh_due(&self) {
        let now = SystemTime::now();
        let idle_limit = self.session_duration * 2;
        let slots: Vec<(SessionKey, Arc<Slot>)> = {
            let mut slots = self.lock();
            slots.retain(|_, slot| {
                let last_used = *slot.last_used.lock().unwrap_or_else(PoisonError::into_inner);
                last_used.is_some_and(|used| now.duration_since(used).unwrap_or_default() < idle_limit)
            });
            slots
                .iter()
                .map(|(key, slot)| (key.clone(), slot.clone()))
                .collect()
        };
        for (session, slot) in slots {
            let due = slot.current().is_none_or(|creds| now >= refresh_at(&creds));
            if !due {
                continue;
            }
            let Ok(_fetching) = slot.fetch.try_lock() else {
                continue; // a request is fetching this session right now
            };
            let result = self.fetch(&session, &slot).await;
            self.metrics.refresh(result.is_ok());
            if let Err(err) = result {
                tracing::warn!(role = %session.role, error = %err, "background credential refresh failed");
            }
        }
    }

    /// Runs [`Self::refresh_due`] every `interval` while the cache lives.
    pub fn spawn_refresher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        crate::periodic::every(interval, self, |cache| async move { cache.refresh_due().await })
    }

    async fn fetch(&self, session: &SessionKey, slot: &Slot) -> Result<Arc<Credentials>, StsError> {
        let started = std::time::Instant::now();
        let result = self.sts.assume_role(session, self.session_duration).await;
        self.metrics
            .sts_call(session.role.as_str(), result.is_ok(), started.elapsed());
        let creds = Arc::new(result?);
        tracing::info!(role = %session.role, session_name = session.session_name.as_str(), "assumed role");
        *slot.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(creds.clone());
        Ok(creds)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn evict_least_recently_used(slots: &mut HashMap<SessionKey, Arc<Slot>>) {
    let oldest = slots
        .iter()
        .min_by_key(|(_, slot)| *slot.last_used.lock().unwrap_or_else(PoisonError::into_inner))
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        slots.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::policy::{RoleArn, SessionName};

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    fn creds(issued: SystemTime, lifetime: Duration) -> Credentials {
        Credentials {
            access_key_id: "ASIATEST".to_owned(),
            secret_access_key: Secret::new("secret".to_owned()),
            session_token: Secret::new("token".to_owned()),
            issued,
            expiration: issued + lifetime,
        }
    }

    fn session(role: &str) -> SessionKey {
        SessionKey {
            role: RoleArn::parse(&format!("arn:aws:iam::123456789012:role/{role}")).unwrap(),
            external_id: None,
            session_name: SessionName::sanitize("test"),
        }
    }

    /// Counts calls; answers with sets of the given lifetime, or fails.
    struct FakeSts {
        calls: AtomicUsize,
        lifetime: Duration,
        fail: std::sync::atomic::AtomicBool,
    }

    impl FakeSts {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                lifetime,
                fail: false.into(),
            })
        }
    }

    #[async_trait::async_trait]
    impl AssumeRole for FakeSts {
        async fn assume_role(&self, session: &SessionKey, _: Duration) -> Result<Credentials, StsError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            // Long enough that every concurrent caller is waiting when the call returns.
            tokio::task::yield_now().await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(StsError {
                    role: session.role.to_string(),
                    message: "down".to_owned(),
                });
            }
            let mut set = creds(SystemTime::now(), self.lifetime);
            set.access_key_id = format!("ASIA{n}");
            Ok(set)
        }
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

    #[test]
    fn refresh_comes_halfway_and_before_the_set_turns_unfit() {
        let issued = SystemTime::UNIX_EPOCH;
        assert_eq!(refresh_at(&creds(issued, HOUR)), issued + 30 * MINUTE);
        // 12 hours: unfit at 11h40m, so refresh at 11h35m would be later than halfway (6h).
        assert_eq!(refresh_at(&creds(issued, 12 * HOUR)), issued + 6 * HOUR);
        // 30 minutes: unfit at 10 minutes (two thirds remain = 20), refresh at 5 minutes.
        assert_eq!(refresh_at(&creds(issued, 30 * MINUTE)), issued + 5 * MINUTE);
        assert!(refresh_at(&creds(issued, 15 * MINUTE)) >= issued);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_requests_make_one_sts_call() {
        let sts = FakeSts::new(HOUR);
        let cache = Arc::new(CredentialCache::new(sts.clone(), HOUR, 100));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&session("app")).await.unwrap().access_key_id.clone() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "ASIA0");
        }
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
        cache.get(&session("other")).await.unwrap();
        assert_eq!(
            sts.calls.load(Ordering::SeqCst),
            2,
            "another role is another session"
        );
    }

    #[tokio::test]
    async fn sts_failure_without_a_usable_set_is_an_error_and_is_not_cached() {
        let sts = FakeSts::new(HOUR);
        sts.fail.store(true, Ordering::SeqCst);
        let cache = CredentialCache::new(sts.clone(), HOUR, 100);
        let err = cache.get(&session("app")).await.unwrap_err();
        assert!(err.to_string().contains("down"), "{err}");
        sts.fail.store(false, Ordering::SeqCst);
        assert_eq!(cache.get(&session("app")).await.unwrap().access_key_id, "ASIA1");
    }

    #[tokio::test]
    async fn sts_failure_serves_the_sessions_own_set_while_it_has_minutes_left() {
        let sts = FakeSts::new(HOUR);
        let cache = CredentialCache::new(sts.clone(), HOUR, 100);
        let key = session("app");
        cache.get(&key).await.unwrap();
        // Age the cached set so it is no longer fit to serve but still has 10 minutes.
        let slot = cache.slot(&key);
        *slot.current.lock().unwrap() = Some(Arc::new(creds(SystemTime::now() - 50 * MINUTE, HOUR)));
        sts.fail.store(true, Ordering::SeqCst);
        assert_eq!(cache.get(&key).await.unwrap().access_key_id, "ASIATEST");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn background_refresh_replaces_due_sets_and_drops_idle_sessions() {
        let sts = FakeSts::new(HOUR);
        let cache = CredentialCache::new(sts.clone(), HOUR, 100);
        let (due, idle) = (session("due"), session("idle"));
        cache.get(&due).await.unwrap();
        cache.get(&idle).await.unwrap();
        *cache.slot(&due).current.lock().unwrap() =
            Some(Arc::new(creds(SystemTime::now() - 31 * MINUTE, HOUR)));
        *cache.slot(&idle).last_used.lock().unwrap() = Some(SystemTime::now() - 3 * HOUR);
        cache.refresh_due().await;
        assert_eq!(cache.len(), 1);
        assert_eq!(
            sts.calls.load(Ordering::SeqCst),
            3,
            "only the due session was refreshed"
        );
        assert_eq!(cache.get(&due).await.unwrap().access_key_id, "ASIA2");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let cache = CredentialCache::new(FakeSts::new(HOUR), HOUR, 2);
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
