//! imds::route: what a request asks for, from its method and path alone, and which paths may be proxied
//! to the node's metadata service: by default every path below `meta-data` and `dynamic`, never the
//! node's secrets ([`REFUSED`]). Pure functions, so every path rule is unit-tested.

use axum::http::Method;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// What a well-formed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`.
    Token,
    /// `meta-data/iam/`: the two entries below it.
    IamIndex,
    /// `meta-data/iam/info`.
    IamInfo,
    /// `meta-data/iam/security-credentials[-extended][/]`: the caller's role name.
    RoleList { extended: bool },
    /// `meta-data/iam/security-credentials[-extended]/<role>`.
    RoleCredentials { extended: bool, role_name: String },
    /// An allowed path, passed to the node's metadata service as it is.
    Proxy { path: String },
}

impl Route {
    /// The route's name in metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::IamIndex => "iam_index",
            Route::IamInfo => "iam_info",
            Route::RoleList { extended: false } => "role_list",
            Route::RoleList { extended: true } => "role_list_extended",
            Route::RoleCredentials { extended: false, .. } => "credentials",
            Route::RoleCredentials { extended: true, .. } => "credentials_extended",
            Route::Proxy { .. } => "proxy",
        }
    }
}

/// The route label of requests refused before they were routed.
pub const UNROUTED: &str = "unrouted";

/// Why a request is refused before anyone looks at who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("malformed path")]
    BadPath,
    #[error("tokens are only issued at /latest/api/token")]
    VersionedToken,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("no such path")]
    NotFound,
    #[error("path not allowed")]
    Denied,
    #[error("path not allowed: the node's secrets are never served (whatever --metadata-proxy-allow says)")]
    NodeOnly,
}

/// The node's secrets, refused to every caller whatever the allow-list says (each path, and
/// everything below it): the node's credentials (answered by the agent for the caller instead), its
/// identity credentials, user-data (often bootstrap secrets), and the signed identity documents,
/// with which a caller could attest as the node.
pub const REFUSED: &[&str] = &[
    "meta-data/iam",
    "meta-data/identity-credentials",
    "user-data",
    "dynamic/instance-identity/pkcs7",
    "dynamic/instance-identity/signature",
    "dynamic/instance-identity/rsa2048",
];

/// Proxied by default: every path below `meta-data` and `dynamic` (and their listings) but the
/// [`REFUSED`] ones. That is what node daemons running as pods read: the VPC CNI its network
/// interfaces, the termination handler its spot and maintenance notices, CSI drivers placement and tags.
pub const DEFAULT_ALLOWED: &[&str] = &["meta-data", "meta-data/**", "dynamic", "dynamic/**"];

/// Paths (below the version, e.g. `meta-data/instance-id`) that may be proxied.
#[derive(Clone, Debug)]
pub struct AllowList {
    globs: GlobSet,
}

impl AllowList {
    /// Globs where `*` stays within a segment and `**` crosses segments.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, globset::Error> {
        let mut set = GlobSetBuilder::new();
        for pattern in patterns {
            let glob: Glob = GlobBuilder::new(pattern.as_ref().trim_start_matches('/'))
                .literal_separator(true)
                .build()?;
            set.add(glob);
        }
        Ok(Self { globs: set.build()? })
    }

    pub fn default_paths() -> Self {
        Self::new(DEFAULT_ALLOWED).expect("default allow-list globs are valid")
    }

    fn allows(&self, below_version: &str) -> Result<(), RouteError> {
        if is_refused(below_version) {
            Err(RouteError::NodeOnly)
        } else if self.globs.is_match(below_version) {
            Ok(())
        } else {
            Err(RouteError::Denied)
        }
    }
}

/// Whether a path below the version starts with one of [`REFUSED`], in any case and whatever follows
/// (`user-data-x`, `meta-data/iam;x/...`, `meta-data/iam./...`): nothing here depends on how the
/// node's service treats odd characters or letter case.
fn is_refused(below_version: &str) -> bool {
    REFUSED.iter().any(|prefix| {
        below_version
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    })
}

/// Routes a request. Checks, in order: the path's shape (400), the token endpoint's rules, the method
/// (405), the paths the agent answers itself, then the node's secrets and the allow-list (403).
pub fn route(method: &Method, path: &str, allow: &AllowList) -> Result<Route, RouteError> {
    if !well_formed(path) {
        return Err(RouteError::BadPath);
    }
    let (version, below) = split_version(path).ok_or(RouteError::NotFound)?;
    if below == "api/token" {
        return match (version, method) {
            ("latest", &Method::PUT) => Ok(Route::Token),
            ("latest", _) => Err(RouteError::MethodNotAllowed),
            _ => Err(RouteError::VersionedToken),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(RouteError::MethodNotAllowed);
    }
    if let Some(iam) = below
        .strip_prefix("meta-data/iam")
        .filter(|rest| rest.is_empty() || rest.starts_with(['/', '-']))
    {
        return iam_route(iam);
    }
    allow.allows(below)?;
    Ok(Route::Proxy {
        path: path.to_owned(),
    })
}

/// The paths below `meta-data/iam`, which the agent answers for the caller and never proxies.
fn iam_route(rest: &str) -> Result<Route, RouteError> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (extended, role) = if let Some(role) = rest.strip_prefix("/security-credentials-extended") {
        (true, role)
    } else if let Some(role) = rest.strip_prefix("/security-credentials") {
        (false, role)
    } else {
        return match rest {
            "" => Ok(Route::IamIndex),
            "/info" => Ok(Route::IamInfo),
            _ => Err(RouteError::NotFound),
        };
    };
    match role.strip_prefix('/') {
        None if role.is_empty() => Ok(Route::RoleList { extended }),
        Some(name) if !name.is_empty() && !name.contains('/') => Ok(Route::RoleCredentials {
            extended,
            role_name: name.to_owned(),
        }),
        _ => Err(RouteError::NotFound),
    }
}

/// Absolute, printable ASCII, no percent-escapes, no empty, `.` or `..` segments (a trailing slash is
/// fine): the allow-list then sees exactly the path the metadata service would.
fn well_formed(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    path.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && (rest.is_empty() || rest.split('/').all(|segment| !matches!(segment, "" | "." | "..")))
}

/// `/latest/meta-data/x` -> (`latest`, `meta-data/x`); versions are `latest` or a date `YYYY-MM-DD`.
fn split_version(path: &str) -> Option<(&str, &str)> {
    let rest = &path[1..];
    let (version, below) = rest.split_once('/').unwrap_or((rest, ""));
    let dated = version.len() == 10
        && version.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    (version == "latest" || dated).then_some((version, below))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Route, RouteError> {
        route(&Method::GET, path, &AllowList::default_paths())
    }

    fn proxied(path: &str) -> Result<Route, RouteError> {
        Ok(Route::Proxy {
            path: path.to_owned(),
        })
    }

    #[test]
    fn token_rules() {
        let allow = AllowList::default_paths();
        assert_eq!(route(&Method::PUT, "/latest/api/token", &allow), Ok(Route::Token));
        assert_eq!(
            route(&Method::PUT, "/2021-03-23/api/token", &allow),
            Err(RouteError::VersionedToken)
        );
        assert_eq!(get("/latest/api/token"), Err(RouteError::MethodNotAllowed));
    }

    #[test]
    fn role_list_with_and_without_slash() {
        for extended in [false, true] {
            let base = if extended {
                "/latest/meta-data/iam/security-credentials-extended"
            } else {
                "/latest/meta-data/iam/security-credentials"
            };
            assert_eq!(get(base), Ok(Route::RoleList { extended }));
            assert_eq!(get(&format!("{base}/")), Ok(Route::RoleList { extended }));
            assert_eq!(
                get(&format!("{base}/app")),
                Ok(Route::RoleCredentials {
                    extended,
                    role_name: "app".to_owned()
                })
            );
            assert_eq!(get(&format!("{base}/app/x")), Err(RouteError::NotFound));
        }
        assert_eq!(
            get("/2021-03-23/meta-data/iam/security-credentials/"),
            Ok(Route::RoleList { extended: false }),
            "dated versions are answered by the agent too, never proxied"
        );
    }

    #[test]
    fn iam_index_and_info_are_answered_and_the_rest_of_iam_is_not_found() {
        assert_eq!(get("/latest/meta-data/iam"), Ok(Route::IamIndex));
        assert_eq!(get("/latest/meta-data/iam/"), Ok(Route::IamIndex));
        assert_eq!(get("/latest/meta-data/iam/info"), Ok(Route::IamInfo));
        assert_eq!(get("/latest/meta-data/iam/other"), Err(RouteError::NotFound));
        assert_eq!(get("/latest/meta-data/iam-x"), Err(RouteError::NotFound));
    }

    /// The refused set, each path and what is below it, at `latest` and at a dated version.
    const NODE_SECRETS: &[&str] = &[
        "user-data",
        "user-data/",
        "user-data/part-1",
        "meta-data/identity-credentials",
        "meta-data/identity-credentials/",
        "meta-data/identity-credentials/ec2/info",
        "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "dynamic/instance-identity/pkcs7",
        "dynamic/instance-identity/signature",
        "dynamic/instance-identity/rsa2048",
        "dynamic/instance-identity/rsa2048/",
    ];

    #[test]
    fn the_nodes_secrets_are_refused_whatever_the_allow_list_says() {
        let everything = AllowList::new(&["**"]).unwrap();
        let named = AllowList::new(NODE_SECRETS).unwrap();
        for below in NODE_SECRETS {
            for version in ["latest", "2021-03-23"] {
                let path = format!("/{version}/{below}");
                for allow in [&AllowList::default_paths(), &everything, &named] {
                    assert_eq!(
                        route(&Method::GET, &path, allow),
                        Err(RouteError::NodeOnly),
                        "{path}"
                    );
                }
            }
        }
        // Another spelling is refused too, whatever the node's service would make of it.
        for path in [
            "/latest/User-Data",
            "/latest/meta-data/Identity-Credentials/ec2/info",
            "/latest/dynamic/instance-identity/PKCS7",
            "/latest/meta-data/IAM/security-credentials/node",
            "/latest/meta-data/iam-x",
            "/latest/user-data-x",
            "/latest/meta-data/iam;x/security-credentials/node",
            "/latest/meta-data/iam./security-credentials/node",
            "/latest/meta-data/iamx",
            "/latest/meta-data/identity-credentials;x/ec2/info",
            "/latest/dynamic/instance-identity/pkcs7;x",
            "/latest/dynamic/instance-identity/signature.",
            "/latest/user-data;x",
        ] {
            assert!(
                matches!(get(path), Err(RouteError::NodeOnly | RouteError::NotFound)),
                "{path}: {:?}",
                get(path)
            );
            assert_eq!(route(&Method::GET, path, &everything).ok(), None, "{path}");
        }
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/tags/instance/Name", &everything),
            proxied("/latest/meta-data/tags/instance/Name")
        );
    }

    #[test]
    fn by_default_every_other_path_below_meta_data_and_dynamic_is_proxied() {
        for path in [
            "/latest/meta-data",
            "/latest/meta-data/",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone",
            "/latest/meta-data/spot/instance-action",
            "/latest/meta-data/events/maintenance/scheduled",
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            "/latest/meta-data/network/interfaces/macs/",
            "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/local-ipv4s",
            "/latest/meta-data/tags/instance/",
            "/latest/meta-data/tags/instance/Name",
            "/latest/meta-data/public-keys/0/openssh-key",
            "/latest/meta-data/instance-id/x",
            "/latest/dynamic",
            "/latest/dynamic/",
            "/latest/dynamic/instance-identity/",
            "/latest/dynamic/instance-identity/document",
            "/2021-03-23/meta-data/instance-id",
            "/2021-03-23/dynamic/instance-identity/document",
        ] {
            assert_eq!(get(path), proxied(path), "{path}");
        }
        for path in ["/latest", "/latest/", "/latest/other", "/latest/meta-datax"] {
            assert_eq!(get(path), Err(RouteError::Denied), "{path}");
        }
    }

    #[test]
    fn an_allow_list_of_its_own_proxies_only_what_it_names() {
        let allow = AllowList::new(&["meta-data/placement/**"]).unwrap();
        assert_eq!(
            route(&Method::GET, "/latest/meta-data/placement/region", &allow),
            proxied("/latest/meta-data/placement/region")
        );
        for path in [
            "/latest/meta-data/instance-id",
            "/latest/meta-data/placement",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert_eq!(
                route(&Method::GET, path, &allow),
                Err(RouteError::Denied),
                "{path}"
            );
        }
    }

    #[test]
    fn odd_paths_are_malformed_or_unknown() {
        for path in [
            "",
            "latest/meta-data/",
            "/latest//meta-data/",
            "/latest/meta-data/../user-data",
            "/latest/./meta-data",
            "/latest/meta-data/%69nstance-id",
            "/latest/meta-data/a b",
            "/latest/meta-data/\\x",
        ] {
            assert_eq!(get(path), Err(RouteError::BadPath), "{path:?}");
        }
        for path in ["/", "/v1/meta-data/instance-id", "/2021-3-23/meta-data/"] {
            assert_eq!(get(path), Err(RouteError::NotFound), "{path:?}");
        }
    }

    #[test]
    fn only_get_and_head_read() {
        let allow = AllowList::default_paths();
        assert_eq!(
            route(&Method::HEAD, "/latest/meta-data/instance-id", &allow),
            proxied("/latest/meta-data/instance-id")
        );
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            assert_eq!(
                route(&method, "/latest/meta-data/iam/security-credentials/", &allow),
                Err(RouteError::MethodNotAllowed)
            );
        }
    }
}
