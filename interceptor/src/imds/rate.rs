//! imds::rate: how many metadata requests a second each caller (a pod, or outside pods a cgroup: a
//! [`LimitKey`]) may make. A request within its caller's budget goes on at once. One over it is held
//! until the budget has room for it, in arrival order, when that is at most [`MAX_HOLD`] away;
//! otherwise it is held [`MAX_HOLD`] all the same and then answered 429, which is what EC2's metadata
//! service answers a caller it throttles.
//!
//! Why hold rather than answer 429 at once: the agent runs one worker thread by default, shared by
//! every pod on the node. A pod answered at once asks again at once, so each keep-alive connection it
//! holds (up to its connection cap) becomes a loop through the agent, whose thread then answers 429s
//! while a quiet pod's request waits behind them in the run queue. Held, a flooding pod costs the
//! agent a timer per held request and, per connection, at most one answer per [`MAX_HOLD`]: its
//! budget's requests and a few hundred 429s a second at most, and its own processes sit blocked in
//! `read` instead of taking the node's CPU. The per-pod connection cap bounds how many of its
//! requests are held at once. A pod that bursts past its budget now and then is slowed, not failed.
//!
//! Budgets follow GCRA, the virtual-scheduling form of a token bucket (`burst` requests at once, then
//! one every `1 / rate`), as the `governor` crate does; written out here because holding needs each
//! held request to reserve its own later slot. `governor` answers a refused check with "not until T"
//! and reserves nothing, so every held request of a pod would wake at T and race, one winning and the
//! rest sleeping again: up to a connection cap's worth of wake-ups per refill on the one worker
//! thread, the load holding is meant to spare. Its own waiting also sleeps on a timer of its own
//! rather than tokio's, which the tests pause.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};

use super::{ImdsMetrics, limits::LimitKey};

/// Sustained requests a second per pod, by default. An SDK makes two or three requests per
/// credential fetch and caches the credentials for most of an hour; a node's agent answers tens of
/// thousands a second, so a hundred per pod costs it little even from every pod at once.
pub const DEFAULT_REQUESTS_PER_SECOND: NonZeroU32 = NonZeroU32::new(100).expect("non-zero");
/// Requests a pod may make at once after a quiet spell, by default: a pod starting a few hundred
/// processes that each fetch credentials.
pub const DEFAULT_BURST: NonZeroU32 = NonZeroU32::new(1000).expect("non-zero");
/// Held longer than this, a request is answered 429 instead: the SDKs give up on the metadata
/// service after 0.5 to 1 s (aws-sdk-go-v2's header timeout; botocore, aws-sdk-rust).
pub const MAX_HOLD: Duration = Duration::from_millis(500);
/// A caller's refused requests make one info line at most this often (each makes a debug line).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often budgets that are whole again are forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(10);

/// How many requests a second each caller may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestQuota {
    /// Sustained requests a second.
    pub per_second: NonZeroU32,
    /// Requests at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl Default for RequestQuota {
    fn default() -> Self {
        Self {
            per_second: DEFAULT_REQUESTS_PER_SECOND,
            burst: DEFAULT_BURST,
        }
    }
}

/// A request refused for its caller's rate.
#[derive(Debug, thiserror::Error)]
#[error(
    "too many metadata requests from this caller: over its rate limit ({} a second, bursts of {})",
    .quota.per_second,
    .quota.burst
)]
pub struct Throttled {
    quota: RequestQuota,
}

/// Every caller's budget.
pub struct RequestRates {
    quota: RequestQuota,
    /// Time between two requests at the sustained rate (GCRA's emission interval).
    interval: Duration,
    /// How far ahead of the sustained rate a caller may be: its burst less one (GCRA's tolerance).
    tolerance: Duration,
    budgets: Mutex<HashMap<LimitKey, Budget>>,
    metrics: ImdsMetrics,
}

#[derive(Debug)]
struct Budget {
    /// When every request reserved so far would have gone at the sustained rate (GCRA's theoretical
    /// arrival time). In the past: the whole burst is free, and the budget can be forgotten.
    reserved_until: Instant,
    /// Refusals since the last info line about this caller, and when that line was.
    refused_unlogged: u64,
    logged_at: Option<Instant>,
}

/// What one request gets.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// It goes on at this instant: now, or later when held.
    GoAt(Instant),
    /// It is over the rate; `log_refused`: the refusals to report, when an info line is due.
    Refuse { log_refused: Option<u64> },
}

impl RequestRates {
    pub fn new(quota: RequestQuota, metrics: ImdsMetrics) -> Self {
        let interval = Duration::from_secs(1) / quota.per_second.get();
        Self {
            quota,
            interval,
            tolerance: interval * (quota.burst.get() - 1),
            budgets: Mutex::default(),
            metrics,
        }
    }

    /// Lets a request of `key` go on, after holding it for its slot if need be; refuses it after
    /// [`MAX_HOLD`] when the caller's budget has no slot for it within that time.
    pub async fn admit(&self, key: &LimitKey) -> Result<(), Throttled> {
        let now = Instant::now();
        match self.decide(key, now) {
            Decision::GoAt(at) if at <= now => Ok(()),
            Decision::GoAt(at) => {
                self.metrics.request_over_rate("held");
                tokio::time::sleep_until(at).await;
                Ok(())
            }
            Decision::Refuse { log_refused } => {
                self.metrics.request_over_rate("refused");
                if let Some(refused) = log_refused {
                    tracing::info!(caller = %key, refused, per_second = self.quota.per_second.get(),
                        burst = self.quota.burst.get(),
                        "metadata requests over their caller's rate limit answered 429 (this line: at most every 10 s per caller)");
                }
                tokio::time::sleep(MAX_HOLD).await;
                Err(Throttled { quota: self.quota })
            }
        }
    }

    /// GCRA with reservations: a request may go `tolerance` ahead of the sustained rate; beyond that
    /// it takes the next free slot, or none when that is more than [`MAX_HOLD`] away.
    fn decide(&self, key: &LimitKey, now: Instant) -> Decision {
        let mut budgets = self.lock();
        let budget = budgets.entry(key.clone()).or_insert(Budget {
            reserved_until: now,
            refused_unlogged: 0,
            logged_at: None,
        });
        let ahead = budget.reserved_until.saturating_duration_since(now);
        let wait = ahead.saturating_sub(self.tolerance);
        if wait > MAX_HOLD {
            budget.refused_unlogged += 1;
            let log_due = budget
                .logged_at
                .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
            if !log_due {
                return Decision::Refuse { log_refused: None };
            }
            budget.logged_at = Some(now);
            let refused = std::mem::take(&mut budget.refused_unlogged);
            return Decision::Refuse {
                log_refused: Some(refused),
            };
        }
        budget.reserved_until = budget.reserved_until.max(now) + self.interval;
        Decision::GoAt(now + wait)
    }

    /// Forgets the budgets that are whole again: a caller that has asked nothing for a burst's worth
    /// of time is as good as new, so pods that are gone leave nothing behind.
    fn forget_whole(&self, now: Instant) {
        let mut budgets = self.lock();
        budgets.retain(|_, budget| budget.reserved_until > now);
        budgets.shrink_to_fit();
    }

    /// Forgets whole budgets every 10 s while `self` lives: the budgets held are then those of the
    /// callers that asked within the time a burst takes to refill (10 s by default; the agent allows
    /// 10 minutes at most) and 10 s more, however many pods come and go.
    pub fn spawn_forgetting(self: &Arc<Self>) -> JoinHandle<()> {
        crate::periodic::every(FORGET_EVERY, self, |rates| async move {
            rates.forget_whole(Instant::now());
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<LimitKey, Budget>> {
        self.budgets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use interceptor_common::CgroupId;

    use super::*;

    fn rates(per_second: u32, burst: u32) -> RequestRates {
        RequestRates::new(
            RequestQuota {
                per_second: NonZeroU32::new(per_second).unwrap(),
                burst: NonZeroU32::new(burst).unwrap(),
            },
            ImdsMetrics::default(),
        )
    }

    const POD: LimitKey = LimitKey::Cgroup(CgroupId(1));
    const OTHER_POD: LimitKey = LimitKey::Cgroup(CgroupId(2));

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_each_request_takes_the_next_slot_until_the_hold_is_too_long() {
        // 10 a second: a slot every 100 ms; a burst of 3.
        let rates = rates(10, 3);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(rates.decide(&POD, now), Decision::GoAt(now));
        }
        for slot in 1..=5 {
            let at = now + Duration::from_millis(100 * slot);
            assert_eq!(rates.decide(&POD, now), Decision::GoAt(at), "slot {slot}");
        }
        // The next slot is 600 ms away, past MAX_HOLD: refused, and it reserves nothing.
        assert!(matches!(rates.decide(&POD, now), Decision::Refuse { .. }));
        let later = now + Duration::from_millis(100);
        assert_eq!(
            rates.decide(&POD, later),
            Decision::GoAt(now + Duration::from_millis(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn callers_have_budgets_of_their_own() {
        let rates = rates(1, 2);
        let now = Instant::now();
        rates.decide(&POD, now);
        rates.decide(&POD, now);
        assert!(matches!(rates.decide(&POD, now), Decision::Refuse { .. }));
        assert_eq!(rates.decide(&OTHER_POD, now), Decision::GoAt(now));
        assert_eq!(rates.decide(&OTHER_POD, now), Decision::GoAt(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_refills_at_the_sustained_rate() {
        let rates = rates(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            rates.decide(&POD, start);
        }
        // 300 ms later three slots have come back: three go at once, the fourth waits its 100 ms.
        let later = start + Duration::from_millis(300);
        for _ in 0..3 {
            assert_eq!(rates.decide(&POD, later), Decision::GoAt(later));
        }
        assert_eq!(
            rates.decide(&POD, later),
            Decision::GoAt(later + Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_goes_on_at_its_slot_and_a_refused_one_is_answered_after_the_hold() {
        let rates = rates(10, 1);
        let start = Instant::now();
        rates.admit(&POD).await.unwrap();
        assert_eq!(Instant::now(), start, "within the budget: at once");
        rates.admit(&POD).await.unwrap();
        assert_eq!(
            Instant::now(),
            start + Duration::from_millis(100),
            "held for its slot"
        );
        // Six slots reserved ahead (to 700 ms), so the next request is refused.
        for _ in 0..5 {
            rates.decide(&POD, Instant::now());
        }
        let asked = Instant::now();
        assert!(rates.admit(&POD).await.is_err());
        assert_eq!(
            Instant::now(),
            asked + MAX_HOLD,
            "refused after the hold, not at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_make_an_info_line_at_most_every_ten_seconds_per_caller() {
        let rates = rates(1, 1);
        let now = Instant::now();
        rates.decide(&POD, now);
        rates.decide(&OTHER_POD, now);
        let refuse = |key, at| match rates.decide(key, at) {
            Decision::Refuse { log_refused } => log_refused,
            go => panic!("{go:?}"),
        };
        assert_eq!(refuse(&POD, now), Some(1), "the first refusal logs");
        for _ in 0..1000 {
            assert_eq!(refuse(&POD, now), None);
        }
        assert_eq!(
            refuse(&OTHER_POD, now),
            Some(1),
            "another caller has its own line"
        );
        // Ten seconds on, the caller floods again from the first instant its budget is spent.
        let later = now + LOG_EVERY;
        rates.decide(&POD, later);
        assert_eq!(
            refuse(&POD, later),
            Some(1001),
            "with the count since the last line"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_of_callers_gone_quiet_are_forgotten_under_churn() {
        let rates = rates(100, 1000);
        let start = Instant::now();
        // 1,000 pods come, ask, and go within 10 s.
        for id in 0..1000 {
            let at = start + Duration::from_millis(10 * id);
            rates.decide(&LimitKey::Cgroup(CgroupId(id)), at);
        }
        let busy = LimitKey::Cgroup(CgroupId(5000));
        let end = start + Duration::from_secs(10);
        for _ in 0..500 {
            rates.decide(&busy, end);
        }
        rates.forget_whole(end);
        assert_eq!(
            rates.lock().len(),
            1,
            "only the caller still ahead of its rate stays"
        );
        rates.forget_whole(end + Duration::from_secs(5));
        assert!(rates.lock().is_empty());
    }
}
