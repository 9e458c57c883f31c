//! Request routing (`imds::route`): any method and path gives a route or a refusal, never a panic;
//! nothing that names the node's secrets is ever proxied, whatever the allow-list; and by default
//! every other path below `meta-data` and `dynamic` is.
//! Input: `<METHOD> <path>`.

#![no_main]

use std::sync::LazyLock;

use http::Method;
use interceptor::imds::route::{AllowList, Route, RouteError, route};
use libfuzzer_sys::fuzz_target;

static DEFAULT_PATHS: LazyLock<AllowList> = LazyLock::new(AllowList::default_paths);
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
    let by_default = route(&method, path, &DEFAULT_PATHS);
    check(&by_default, path);
    check(&route(&method, path, &EVERYTHING), path);
    if by_default == Err(RouteError::Denied) {
        assert!(
            !below_meta_data_or_dynamic(path),
            "{path:?} is below meta-data or dynamic and names no secret: the defaults proxy it"
        );
    }
});

fn check(routed: &Result<Route, RouteError>, path: &str) {
    match routed {
        Ok(Route::Proxy { path: proxied }) => {
            assert_eq!(proxied, path, "a proxied path is passed on as it came");
            assert!(!names_node_secrets(path), "{path:?} must never be proxied");
        }
        Ok(Route::RoleCredentials { role_name, .. }) => {
            assert!(!role_name.is_empty() && !role_name.contains('/'), "{role_name:?}");
        }
        Err(RouteError::NodeOnly) => {
            assert!(names_node_secrets(path), "{path:?} refused as a secret, but names none");
        }
        _ => {}
    }
}

/// The node's credentials, identity credentials, user-data and signed identity documents, by segment
/// below the version, in any case, and a segment that merely starts with such a name (`user-data-x`,
/// `iam;x`): written apart from the router's own prefix rule, so the two check each other.
fn names_node_secrets(path: &str) -> bool {
    let names = |segment: Option<&str>, name: &str| {
        segment.is_some_and(|segment| segment.to_ascii_lowercase().starts_with(name))
    };
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let at = |index: usize| segments.get(index).copied();
    let top = at(0).map(str::to_ascii_lowercase);
    match top.as_deref() {
        Some("meta-data") => names(at(1), "iam") || names(at(1), "identity-credentials"),
        Some("dynamic") => {
            at(1).is_some_and(|segment| segment.eq_ignore_ascii_case("instance-identity"))
                && ["pkcs7", "signature", "rsa2048"]
                    .iter()
                    .any(|name| names(at(2), name))
        }
        _ => names(at(0), "user-data"),
    }
}

/// `/<version>/meta-data[/...]` or `/<version>/dynamic[/...]`, exactly so spelled.
fn below_meta_data_or_dynamic(path: &str) -> bool {
    matches!(path.split('/').nth(2), Some("meta-data" | "dynamic"))
}
