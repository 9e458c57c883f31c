//! Request routing (`imds::route`): any method and path gives a route or a refusal, never a panic, and
//! nothing that names the node's secrets is ever proxied, whatever the allow-list.
//! Input: `<METHOD> <path>`.

#![no_main]

use std::sync::LazyLock;

use http::Method;
use interceptor::imds::route::{AllowList, Route, route};
use libfuzzer_sys::fuzz_target;

static DEFAULT_FACTS: LazyLock<AllowList> = LazyLock::new(AllowList::default_facts);
static EVERYTHING: LazyLock<AllowList> =
    LazyLock::new(|| AllowList::new(&["**"]).expect("`**` is a valid glob"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((method, path)) = text.split_once(' ') else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    for allow in [&*DEFAULT_FACTS, &*EVERYTHING] {
        check(route(&method, path, allow), path);
    }
});

fn check(routed: Result<Route, impl std::fmt::Debug>, path: &str) {
    match routed {
        Ok(Route::Proxy { path: proxied }) => {
            assert_eq!(proxied, path, "a proxied path is passed on as it came");
            assert!(!names_node_secrets(path), "{path:?} must never be proxied");
        }
        Ok(Route::RoleCredentials { role_name, .. }) => {
            assert!(!role_name.is_empty() && !role_name.contains('/'), "{role_name:?}");
        }
        _ => {}
    }
}

/// The node's credentials, identity credentials and user-data, by segment (below the version):
/// written apart from the router's own prefix rule, so the two check each other.
fn names_node_secrets(path: &str) -> bool {
    let mut segments = path.split('/').skip(2);
    match (segments.next(), segments.next()) {
        (Some("user-data"), _) => true,
        (Some("meta-data"), Some(below)) => below == "iam" || below == "identity-credentials",
        _ => false,
    }
}
