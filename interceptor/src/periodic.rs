//! periodic: background chores (re-reading the workload file, refreshing credentials) that run on a
//! timer for as long as the thing they serve is alive.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{task::JoinHandle, time::MissedTickBehavior};

/// Calls `chore(owner)` every `interval` until `owner` is dropped. Holds only a weak reference, so the
/// task never keeps its owner alive.
pub fn every<T, F, Fut>(interval: Duration, owner: &Arc<T>, chore: F) -> JoinHandle<()>
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let owner = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(owner) = owner.upgrade() else { return };
            chore(owner).await;
        }
    })
}
