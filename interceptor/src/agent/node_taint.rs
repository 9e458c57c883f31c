//! agent::node_taint: the readiness taint (`--remove-node-taint KEY`). Nodes register with a taint
//! that keeps pods off them; once the agent is ready it removes every taint with that key from its own
//! Node, so pods land only where their metadata calls will be served. This module owns that one
//! removal: the read, the JSON patch that changes `spec.taints` only if nobody else changed it since
//! (a `test` of the list read, then its replacement), and the retries until it is done. Nothing puts
//! the taint back: a restarted agent's pinned programs refuse connections until it is ready again.

use std::time::Duration;

use json_patch::{PatchOperation, RemoveOperation, ReplaceOperation, TestOperation, jsonptr::Pointer};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Where a Node keeps its taints.
const TAINTS: &Pointer = Pointer::from_static("/spec/taints");
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What one attempt found.
#[derive(Debug, PartialEq)]
enum Outcome {
    Removed,
    Absent,
}

/// Removes every taint with `key` from Node `node`, retrying with backoff until the API server has
/// done it or says the node carries none. Returns only then: run it in a task of its own.
pub async fn remove(client: Client, node: &str, key: &str) {
    let nodes = Api::<Node>::all(client);
    let mut retry = FIRST_RETRY;
    loop {
        match remove_once(&nodes, node, key).await {
            Ok(Outcome::Removed) => {
                tracing::info!(key, node, "node taint removed");
                return;
            }
            Ok(Outcome::Absent) => {
                tracing::info!(key, node, "node taint absent: nothing to remove");
                return;
            }
            Err(err) => {
                tracing::warn!(key, node, error = %crate::error_chain(&err), retry_in = ?retry,
                    "cannot remove the node taint");
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// Reads the node and, when it has the taint, patches the taints read into the taints kept. A list
/// changed by someone else meanwhile fails the patch's test (422), and the next attempt reads again.
async fn remove_once(nodes: &Api<Node>, node: &str, key: &str) -> Result<Outcome, kube::Error> {
    let current = nodes.get(node).await?;
    let taints = current.spec.and_then(|spec| spec.taints).unwrap_or_default();
    let Some(kept) = without_key(&taints, key) else {
        return Ok(Outcome::Absent);
    };
    let patch = taints_patch(&taints, &kept).map_err(kube::Error::SerdeError)?;
    nodes
        .patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(Outcome::Removed)
}

/// The taints left once every taint with `key` is gone; `None` when no taint has it.
fn without_key(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints.iter().filter(|taint| taint.key != key).cloned().collect();
    (kept.len() < taints.len()).then_some(kept)
}

/// A JSON patch from `read` to `kept`, applied only while the node's taints are still `read`. An
/// empty list is removed, as the API server leaves out an empty `taints`.
fn taints_patch(read: &[Taint], kept: &[Taint]) -> serde_json::Result<json_patch::Patch> {
    let path = TAINTS.to_buf();
    let test = PatchOperation::Test(TestOperation {
        path: path.clone(),
        value: serde_json::to_value(read)?,
    });
    let change = if kept.is_empty() {
        PatchOperation::Remove(RemoveOperation { path })
    } else {
        PatchOperation::Replace(ReplaceOperation {
            path,
            value: serde_json::to_value(kept)?,
        })
    };
    Ok(json_patch::Patch(vec![test, change]))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const KEY: &str = "interceptor.dev/agent-not-ready";

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.to_owned(),
            value: value.map(str::to_owned),
            effect: effect.to_owned(),
            time_added: None,
        }
    }

    #[test]
    fn every_taint_with_the_key_goes_whatever_its_value_and_effect() {
        let unrelated = taint("dedicated", Some("gpu"), "NoSchedule");
        let taints = [
            taint(KEY, Some("true"), "NoSchedule"),
            unrelated.clone(),
            taint(KEY, None, "NoExecute"),
        ];
        assert_eq!(without_key(&taints, KEY), Some(vec![unrelated]));
    }

    #[test]
    fn no_taint_with_the_key_is_nothing_to_remove() {
        let taints = [taint("dedicated", Some("gpu"), "NoSchedule")];
        assert_eq!(without_key(&taints, KEY), None);
        assert_eq!(without_key(&[], KEY), None);
        // A key is matched whole, not as a prefix.
        assert_eq!(
            without_key(&[taint("interceptor.dev/agent", None, "NoSchedule")], KEY),
            None
        );
    }

    #[test]
    fn the_patch_tests_the_list_read_before_replacing_it() {
        let read = [
            taint(KEY, Some("true"), "NoSchedule"),
            taint("dedicated", Some("gpu"), "NoSchedule"),
        ];
        let kept = without_key(&read, KEY).expect("the key is there");
        let patch = taints_patch(&read, &kept).expect("taints serialize");
        assert_eq!(
            serde_json::to_value(&patch).expect("a patch serializes"),
            json!([
                {"op": "test", "path": "/spec/taints", "value": [
                    {"key": KEY, "value": "true", "effect": "NoSchedule"},
                    {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                ]},
                {"op": "replace", "path": "/spec/taints", "value": [
                    {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                ]},
            ])
        );
    }

    #[test]
    fn the_last_taint_gone_removes_the_list() {
        let read = [taint(KEY, None, "NoSchedule")];
        let patch = taints_patch(&read, &[]).expect("taints serialize");
        assert_eq!(
            serde_json::to_value(&patch).expect("a patch serializes"),
            json!([
                {"op": "test", "path": "/spec/taints", "value": [{"key": KEY, "effect": "NoSchedule"}]},
                {"op": "remove", "path": "/spec/taints"},
            ])
        );
    }
}
