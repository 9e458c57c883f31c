//! workload::kube::events: Kubernetes Events on a pod that was refused a role (its annotation is not
//! valid, its namespace does not allow the role, STS denied it), so the pod's owners see why in
//! `kubectl describe pod` instead of only in the agent's log. At most one Event per pod and reason per
//! [`EVENT_INTERVAL`]: an SDK retrying in a loop must not flood the API server.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

use super::KubeMetrics;
use crate::workload::{PodRef, Refusal};

/// How often one pod gets an Event for one reason. Longer than the recorder's own 6-minute series
/// cache, so every Event is a new one (`create`, the only verb on events the agent's RBAC has), never a
/// patch of the last.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Pods and reasons remembered at most; older entries go first when the map is full.
const REMEMBERED: usize = 10_000;

pub struct PodEvents {
    recorder: Recorder,
    last_posted: Mutex<HashMap<(String, Refusal), Instant>>,
    metrics: KubeMetrics,
}

impl PodEvents {
    pub fn new(client: Client, node: &str, metrics: KubeMetrics) -> Self {
        let reporter = Reporter {
            controller: "interceptor".to_owned(),
            instance: Some(format!("interceptor-{node}")),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            last_posted: Mutex::default(),
            metrics,
        }
    }

    /// Posts a Warning Event on `pod` in the background, unless one for the same reason went out within
    /// the interval.
    pub fn refused(&self, pod: &PodRef, refusal: Refusal, message: &str) {
        let reason = reason_of(refusal);
        self.metrics.refused(label_of(refusal));
        if !self.due(pod, refusal, Instant::now()) {
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            // Events hold at most 1 kB of note.
            note: Some(message.chars().take(1000).collect()),
            action: "AssumeRole".to_owned(),
            secondary: None,
        };
        let regarding = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        };
        let recorder = self.recorder.clone();
        let metrics = self.metrics.clone();
        let label = label_of(refusal);
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        tokio::spawn(async move {
            let result = recorder.publish(&event, &regarding).await;
            metrics.event(label, result.is_ok());
            match result {
                Ok(()) => tracing::info!(pod = pod_name, reason = event.reason, "event posted"),
                Err(err) => {
                    tracing::warn!(pod = pod_name, reason = event.reason, error = %crate::error_chain(&err), "cannot post event")
                }
            }
        });
    }

    /// Whether an Event for `pod` and `refusal` may go out at `now`; if so, records it.
    fn due(&self, pod: &PodRef, refusal: Refusal, now: Instant) -> bool {
        let mut last_posted = self.last_posted.lock().unwrap_or_else(|e| e.into_inner());
        let key = (pod.uid.clone(), refusal);
        if last_posted
            .get(&key)
            .is_some_and(|posted| now.duration_since(*posted) < EVENT_INTERVAL)
        {
            return false;
        }
        if last_posted.len() >= REMEMBERED {
            last_posted.retain(|_, posted| now.duration_since(*posted) < EVENT_INTERVAL);
        }
        last_posted.insert(key, now);
        true
    }
}

/// The Event's reason, as `kubectl describe` shows it.
fn reason_of(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::BadAnnotation => "IAMRoleAnnotationInvalid",
        Refusal::NamespaceRestricted => "IAMRoleNotAllowed",
        Refusal::BadSessionTags => "IAMSessionTagsInvalid",
        Refusal::AssumeRoleFailed => "IAMAssumeRoleFailed",
    }
}

/// The metrics' label.
fn label_of(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::BadAnnotation => "bad_annotation",
        Refusal::NamespaceRestricted => "namespace_restricted",
        Refusal::BadSessionTags => "bad_session_tags",
        Refusal::AssumeRoleFailed => "assume_role_failed",
    }
}
