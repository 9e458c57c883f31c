//! policy::tags: the STS session tags a session carries. Pods get the tags the EKS Pod Identity agent
//! sends, under the same keys ([`SessionTags::for_pod`], with `--session-tags`); a static workload
//! file entry names its own. Every key and value is checked against STS's rules where it is read, so a
//! tag STS would refuse is a refusal of the workload, never a session without the tags asked for.

use std::fmt;

use crate::Echo;

/// STS's limit on the tags of one session.
pub const MAX_TAGS: usize = 50;
/// STS's limit on a tag key, in characters.
pub const MAX_KEY_CHARS: usize = 128;
/// STS's limit on a tag value, in characters.
pub const MAX_VALUE_CHARS: usize = 256;

/// The pod tags' keys, as the EKS Pod Identity agent names them.
pub const NAMESPACE_KEY: &str = "kubernetes-namespace";
pub const SERVICE_ACCOUNT_KEY: &str = "kubernetes-service-account";
pub const POD_NAME_KEY: &str = "kubernetes-pod-name";
pub const POD_UID_KEY: &str = "kubernetes-pod-uid";
/// `--cluster-name`'s tag. Pod Identity names it `eks-cluster-name`, which is sent too with the same
/// value, so policies written for either key work.
pub const CLUSTER_NAME_KEY: &str = "kubernetes-cluster-name";
pub const EKS_CLUSTER_NAME_KEY: &str = "eks-cluster-name";

/// Why a set of tags cannot be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("more than {MAX_TAGS} session tags")]
    TooMany,
    #[error("tag key {} is not 1-{MAX_KEY_CHARS} characters", Echo(.0))]
    KeyLength(String),
    #[error("tag key {} starts with `aws:`, which AWS keeps for itself", Echo(.0))]
    ReservedKey(String),
    #[error("tag key {} appears twice (STS compares keys without case)", Echo(.0))]
    DuplicateKey(String),
    #[error("tag {key}'s value is longer than STS takes ({MAX_VALUE_CHARS} characters)")]
    LongValue { key: String },
    #[error("tag {}: {} may only hold letters, digits, spaces and _.:/=+-@", Echo(.key), Echo(.text))]
    Character { key: String, text: String },
}

/// The names a pod's tags carry.
#[derive(Clone, Copy, Debug)]
pub struct PodNames<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// How pods are tagged (`--session-tags`, `--cluster-name`, `--session-tags-transitive`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionTagging {
    /// Tagged as [`CLUSTER_NAME_KEY`] and [`EKS_CLUSTER_NAME_KEY`]; checked when the agent starts.
    pub cluster_name: Option<String>,
    /// Every tag is passed on to the sessions the role's session goes on to assume (role chaining).
    pub transitive: bool,
}

impl SessionTagging {
    /// Checks the cluster name as a tag value, so a bad one stops the agent at start rather than
    /// refusing every pod.
    pub fn new(cluster_name: Option<String>, transitive: bool) -> Result<Self, TagError> {
        if let Some(name) = &cluster_name {
            check_value(CLUSTER_NAME_KEY, name)?;
        }
        Ok(Self {
            cluster_name,
            transitive,
        })
    }
}

/// A session's tags, checked; in key order, so two sets of the same tags are one cache key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionTags {
    tags: Vec<(String, String)>,
    transitive: bool,
}

impl SessionTags {
    /// Checks `tags` against STS's rules.
    pub fn new(tags: impl IntoIterator<Item = (String, String)>, transitive: bool) -> Result<Self, TagError> {
        let mut tags: Vec<(String, String)> = tags.into_iter().collect();
        if tags.len() > MAX_TAGS {
            return Err(TagError::TooMany);
        }
        for (key, value) in &tags {
            check_key(key)?;
            check_value(key, value)?;
        }
        tags.sort_by_cached_key(|(key, _)| key.to_lowercase());
        if let Some(pair) = tags
            .windows(2)
            .find(|pair| pair[0].0.to_lowercase() == pair[1].0.to_lowercase())
        {
            return Err(TagError::DuplicateKey(pair[1].0.clone()));
        }
        Ok(Self { tags, transitive })
    }

    /// A pod's tags: its namespace, ServiceAccount, name and uid, and the cluster's name when set.
    pub fn for_pod(tagging: &SessionTagging, pod: PodNames<'_>) -> Result<Self, TagError> {
        let mut tags = vec![
            (NAMESPACE_KEY, pod.namespace),
            (SERVICE_ACCOUNT_KEY, pod.service_account),
            (POD_NAME_KEY, pod.name),
            (POD_UID_KEY, pod.uid),
        ];
        if let Some(cluster) = &tagging.cluster_name {
            tags.extend([
                (CLUSTER_NAME_KEY, cluster.as_str()),
                (EKS_CLUSTER_NAME_KEY, cluster),
            ]);
        }
        Self::new(
            tags.into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned())),
            tagging.transitive,
        )
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The tags, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tags
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The keys STS is to pass on to chained sessions: all of them, or none.
    pub fn transitive_keys(&self) -> impl Iterator<Item = &str> {
        let count = if self.transitive { self.tags.len() } else { 0 };
        self.tags[..count].iter().map(|(key, _)| key.as_str())
    }
}

impl fmt::Display for SessionTags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (key, value)) in self.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            write!(f, "{separator}{key}={value}")?;
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), TagError> {
    if key.is_empty() || key.chars().nth(MAX_KEY_CHARS).is_some() {
        return Err(TagError::KeyLength(key.to_owned()));
    }
    if key
        .get(..4)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("aws:"))
    {
        return Err(TagError::ReservedKey(key.to_owned()));
    }
    check_characters(key, key)
}

fn check_value(key: &str, value: &str) -> Result<(), TagError> {
    if value.chars().nth(MAX_VALUE_CHARS).is_some() {
        return Err(TagError::LongValue { key: key.to_owned() });
    }
    check_characters(key, value)
}

/// STS's pattern for keys and values, `[\p{L}\p{Z}\p{N}_.:/=+\-@]`: letters, separators (spaces, not
/// tabs or line breaks), digits and those symbols.
fn check_characters(key: &str, text: &str) -> Result<(), TagError> {
    let allowed = |c: char| c.is_alphanumeric() || is_separator(c) || "_.:/=+-@".contains(c);
    if text.chars().all(allowed) {
        Ok(())
    } else {
        Err(TagError::Character {
            key: key.to_owned(),
            text: text.to_owned(),
        })
    }
}

/// Unicode's separators (`\p{Z}`): the space characters and the line and paragraph separators, which
/// `char::is_whitespace` would widen to tabs and line breaks.
fn is_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodNames<'static> {
        PodNames {
            namespace: "shop",
            service_account: "cart",
            name: "cart-7d9f-x2",
            uid: "5f0c6a1e-4a4e-4b7e-9d1c-0b6c1a2f3e4d",
        }
    }

    fn pairs(tags: &SessionTags) -> Vec<(&str, &str)> {
        tags.iter().collect()
    }

    #[test]
    fn a_pod_carries_the_keys_pod_identity_uses() {
        let tags = SessionTags::for_pod(&SessionTagging::default(), pod()).unwrap();
        assert_eq!(
            pairs(&tags),
            [
                ("kubernetes-namespace", "shop"),
                ("kubernetes-pod-name", "cart-7d9f-x2"),
                ("kubernetes-pod-uid", "5f0c6a1e-4a4e-4b7e-9d1c-0b6c1a2f3e4d"),
                ("kubernetes-service-account", "cart"),
            ]
        );
        assert_eq!(tags.transitive_keys().count(), 0);
    }

    #[test]
    fn the_cluster_name_goes_under_both_keys_and_transitive_covers_every_tag() {
        let tagging = SessionTagging::new(Some("prod-eu".to_owned()), true).unwrap();
        let tags = SessionTags::for_pod(&tagging, pod()).unwrap();
        let pairs = pairs(&tags);
        assert!(
            pairs.contains(&("kubernetes-cluster-name", "prod-eu")),
            "{pairs:?}"
        );
        assert!(pairs.contains(&("eks-cluster-name", "prod-eu")), "{pairs:?}");
        assert_eq!(tags.transitive_keys().count(), 6);
    }

    #[test]
    fn values_over_stss_limit_or_with_characters_it_refuses_are_refused() {
        let long = "p".repeat(MAX_VALUE_CHARS + 1);
        let refused = SessionTags::for_pod(&SessionTagging::default(), PodNames { name: &long, ..pod() });
        assert_eq!(
            refused,
            Err(TagError::LongValue {
                key: POD_NAME_KEY.to_owned()
            })
        );
        let exact = "p".repeat(MAX_VALUE_CHARS);
        assert!(
            SessionTags::for_pod(
                &SessionTagging::default(),
                PodNames {
                    name: &exact,
                    ..pod()
                }
            )
            .is_ok()
        );
        for bad in ["a!b", "tab\there", "line\nbreak", "semi;colon", "quote\"", "a#b"] {
            let refused = SessionTags::for_pod(&SessionTagging::default(), PodNames { name: bad, ..pod() });
            assert!(
                matches!(refused, Err(TagError::Character { .. })),
                "{bad:?}: {refused:?}"
            );
        }
        for good in ["", "a b", "ünïcödé", "x_.:/=+-@9", "名前", "non\u{a0}breaking"] {
            assert!(
                SessionTags::new([("k".to_owned(), good.to_owned())], false).is_ok(),
                "{good:?}"
            );
        }
    }

    #[test]
    fn keys_follow_stss_rules() {
        let one = |key: &str| SessionTags::new([(key.to_owned(), "v".to_owned())], false);
        assert_eq!(one(""), Err(TagError::KeyLength(String::new())));
        assert!(one(&"k".repeat(MAX_KEY_CHARS)).is_ok());
        assert!(matches!(
            one(&"k".repeat(MAX_KEY_CHARS + 1)),
            Err(TagError::KeyLength(_))
        ));
        assert_eq!(one("AWS:team"), Err(TagError::ReservedKey("AWS:team".to_owned())));
        assert!(matches!(one("te am!"), Err(TagError::Character { .. })));
        let twice = SessionTags::new(
            [
                ("Team".to_owned(), "a".to_owned()),
                ("team".to_owned(), "b".to_owned()),
            ],
            false,
        );
        assert!(matches!(twice, Err(TagError::DuplicateKey(_))), "{twice:?}");
        let many = (0..=MAX_TAGS).map(|i| (format!("k{i}"), String::new()));
        assert_eq!(SessionTags::new(many, false), Err(TagError::TooMany));
    }

    #[test]
    fn a_bad_cluster_name_is_refused_at_start() {
        assert!(SessionTagging::new(Some("prod eu/1".to_owned()), false).is_ok());
        assert!(matches!(
            SessionTagging::new(Some("prod\neu".to_owned()), false),
            Err(TagError::Character { .. })
        ));
        assert!(SessionTagging::new(Some("c".repeat(MAX_VALUE_CHARS + 1)), false).is_err());
    }

    #[test]
    fn the_same_tags_in_any_order_are_one_set() {
        let forward = SessionTags::new([("a".into(), "1".into()), ("b".into(), "2".into())], false).unwrap();
        let backward = SessionTags::new([("b".into(), "2".into()), ("a".into(), "1".into())], false).unwrap();
        assert_eq!(forward, backward);
        assert_eq!(forward.to_string(), "a=1,b=2");
    }
}
