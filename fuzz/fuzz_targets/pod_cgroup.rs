//! Kubelet cgroup paths (`identity::parse_pod_cgroup`): any path gives a pod or none without a panic,
//! the ids found are canonical, and slashes around the path change nothing.
//! Input: the path.

#![no_main]

use interceptor::identity::{PodCgroup, parse_pod_cgroup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_pod_cgroup(path);
    if let Some(pod) = &parsed {
        check_ids(pod);
    }
    assert_eq!(parse_pod_cgroup(&format!("/{path}/")), parsed);
});

/// A pod UID is lowercase 8-4-4-4-12 hex, or a static pod's 32-hex config hash; a container id is 64
/// lowercase hex digits.
fn check_ids(pod: &PodCgroup) {
    let uid = pod.pod_uid.as_str();
    let groups: Vec<usize> = uid.split('-').map(str::len).collect();
    assert!(groups == [8, 4, 4, 4, 12] || groups == [32], "{uid:?}");
    assert!(uid.bytes().all(|b| b == b'-' || is_lower_hex(b)), "{uid:?}");
    if let Some(id) = &pod.container_id {
        assert!(
            id.as_str().len() == 64 && id.as_str().bytes().all(is_lower_hex),
            "{id:?}"
        );
    }
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}
