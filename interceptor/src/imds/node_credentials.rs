//! imds::node_credentials: which pods get the node's own instance-profile credentials (the
//! node-credentials setting, `--host-network-credentials` and `--node-credentials-for`), and the record
//! of the pods that got them, for the log and `interceptor status`.
//!
//! Only a pod that names no role is ever granted them: hostNetwork pods by default, as kube2iam's DNAT
//! rule let them reach the node's metadata service (the VPC CNI's aws-node assigns pod IPs with them),
//! and pods running as a ServiceAccount the operator names. A granted pod's `meta-data/iam` paths are
//! passed to the node's metadata service ([`super`]); every other caller's are answered for its own role.

use std::{num::NonZeroUsize, sync::Mutex, time::SystemTime};

use lru::LruCache;

use crate::workload::{PodRef, Workload};

/// What a hostNetwork pod that names no role gets (`--host-network-credentials`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostNetworkCredentials {
    /// The node's own credentials, as under kube2iam.
    #[default]
    Node,
    /// The default role, like any other pod (nothing without one).
    DefaultRole,
    /// Nothing (404), as a pod without a role.
    None,
}

/// Why a pod is given the node's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grant {
    /// It is a hostNetwork pod, under `--host-network-credentials node`.
    HostNetwork,
    /// It runs as a ServiceAccount `--node-credentials-for` names.
    ServiceAccount,
}

impl Grant {
    /// The grant's name in metrics, logs and `interceptor status`.
    pub fn label(self) -> &'static str {
        match self {
            Self::HostNetwork => "host_network",
            Self::ServiceAccount => "service_account",
        }
    }
}

/// What a workload's `meta-data/iam` paths are answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entitlement {
    /// The node's own credentials, proxied from its metadata service.
    Node(Grant),
    /// What the role policy gives it: the role it names, else the default role, else nothing.
    Policy,
    /// Nothing: a hostNetwork pod that names no role, under `--host-network-credentials none`.
    Nothing,
}

/// A ServiceAccount, as `--node-credentials-for` names it: `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{entry:?} is not NAMESPACE/SERVICEACCOUNT: {problem}")]
pub struct BadServiceAccountRef {
    entry: String,
    problem: &'static str,
}

impl ServiceAccountRef {
    /// `kube-system/aws-node`: a namespace (a DNS label) and a ServiceAccount name (a DNS subdomain),
    /// as Kubernetes requires them, so a typo is an error at start-up rather than a grant to nobody.
    pub fn parse(entry: &str) -> Result<Self, BadServiceAccountRef> {
        let bad = |problem| BadServiceAccountRef {
            entry: entry.to_owned(),
            problem,
        };
        let (namespace, name) = entry
            .split_once('/')
            .ok_or_else(|| bad("no `/` between the namespace and the ServiceAccount"))?;
        if !is_dns_label(namespace) {
            return Err(bad(
                "the namespace must be 1-63 lower-case letters, digits and `-`, starting and ending with a letter or digit",
            ));
        }
        if name.len() > 253 || !name.split('.').all(is_dns_label) {
            return Err(bad(
                "the ServiceAccount name must be up to 253 characters of dot-separated lower-case DNS labels",
            ));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn is(&self, pod: &PodRef) -> bool {
        self.namespace == pod.namespace && self.name == pod.service_account
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, starting and ending with a letter or digit.
fn is_dns_label(text: &str) -> bool {
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&text.len())
        && text.bytes().all(|b| alphanumeric(&b) || b == b'-')
        && text.as_bytes().first().is_some_and(alphanumeric)
        && text.as_bytes().last().is_some_and(alphanumeric)
}

/// How many pods `interceptor status` lists as given the node's credentials (the most recent).
pub const REMEMBERED_PODS: NonZeroUsize = NonZeroUsize::new(64).expect("non-zero");

/// A pod that was given the node's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedPod {
    pub pod: PodRef,
    pub grant: Grant,
    /// Credential documents it was given.
    pub answers: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// The node-credentials setting, and the pods it gave the node's credentials to.
#[derive(Debug)]
pub struct NodeCredentials {
    host_network: HostNetworkCredentials,
    service_accounts: Vec<ServiceAccountRef>,
    /// By pod UID, the most recently served first.
    served: Mutex<LruCache<String, ServedPod>>,
}

impl Default for NodeCredentials {
    fn default() -> Self {
        Self::new(HostNetworkCredentials::default(), Vec::new())
    }
}

impl NodeCredentials {
    pub fn new(host_network: HostNetworkCredentials, service_accounts: Vec<ServiceAccountRef>) -> Self {
        Self {
            host_network,
            service_accounts,
            served: Mutex::new(LruCache::new(REMEMBERED_PODS)),
        }
    }

    /// What `workload` gets. A workload that names a role (itself, or through its ServiceAccount with
    /// `--serviceaccount-roles`) always gets the policy's answer, and so does anything that is not a
    /// pod; of the rest, a pod of a ServiceAccount `--node-credentials-for` names gets the node's
    /// credentials, and a hostNetwork pod what `--host-network-credentials` says.
    pub fn entitlement(&self, workload: &Workload) -> Entitlement {
        let Some(pod) = workload.pod.as_ref().filter(|_| workload.request.role.is_none()) else {
            return Entitlement::Policy;
        };
        if self.service_accounts.iter().any(|account| account.is(pod)) {
            return Entitlement::Node(Grant::ServiceAccount);
        }
        match (pod.host_network, self.host_network) {
            (false, _) | (true, HostNetworkCredentials::DefaultRole) => Entitlement::Policy,
            (true, HostNetworkCredentials::Node) => Entitlement::Node(Grant::HostNetwork),
            (true, HostNetworkCredentials::None) => Entitlement::Nothing,
        }
    }

    /// Records that `pod` was given the node's credentials, and logs it at info the first time (while
    /// the pod is among the [`REMEMBERED_PODS`] served last).
    pub fn served(&self, pod: &PodRef, grant: Grant) {
        let now = SystemTime::now();
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = served.get_mut(&pod.uid) {
            known.answers += 1;
            known.last = now;
            known.grant = grant;
            return;
        }
        served.put(
            pod.uid.clone(),
            ServedPod {
                pod: pod.clone(),
                grant,
                answers: 1,
                first: now,
                last: now,
            },
        );
        drop(served);
        tracing::info!(
            namespace = pod.namespace,
            pod = pod.name,
            uid = pod.uid,
            grant = grant.label(),
            "node credentials served to a pod"
        );
    }

    /// The pods given the node's credentials, the most recent first.
    pub fn pods_served(&self) -> Vec<ServedPod> {
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.iter().map(|(_, pod)| pod.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RoleRequest;

    fn pod(namespace: &str, account: &str, host_network: bool, role: Option<&str>) -> Workload {
        Workload {
            name: format!("{namespace}/p"),
            session_name: format!("{namespace}.p"),
            request: RoleRequest {
                role: role.map(str::to_owned),
                ..RoleRequest::default()
            },
            pod: Some(PodRef {
                namespace: namespace.to_owned(),
                name: "p".to_owned(),
                uid: format!("uid-{namespace}-{account}-{host_network}"),
                host_network,
                service_account: account.to_owned(),
            }),
        }
    }

    fn aws_node() -> ServiceAccountRef {
        ServiceAccountRef::parse("kube-system/aws-node").unwrap()
    }

    #[test]
    fn by_default_a_host_network_pod_that_names_no_role_gets_the_nodes_credentials_and_no_other_pod_does() {
        let setting = NodeCredentials::default();
        let host_network = pod("kube-system", "aws-node", true, None);
        assert_eq!(
            setting.entitlement(&host_network),
            Entitlement::Node(Grant::HostNetwork)
        );
        for other in [
            pod("kube-system", "aws-node", true, Some("cni")),
            pod("kube-system", "aws-node", false, None),
            pod("shop", "default", false, None),
        ] {
            assert_eq!(setting.entitlement(&other), Entitlement::Policy, "{other:?}");
        }
        let not_a_pod = Workload {
            pod: None,
            ..host_network
        };
        assert_eq!(setting.entitlement(&not_a_pod), Entitlement::Policy);
    }

    #[test]
    fn host_network_pods_get_the_default_role_or_nothing_when_told_so() {
        let host_network = pod("kube-system", "aws-node", true, None);
        let default_role = NodeCredentials::new(HostNetworkCredentials::DefaultRole, Vec::new());
        assert_eq!(default_role.entitlement(&host_network), Entitlement::Policy);
        let none = NodeCredentials::new(HostNetworkCredentials::None, Vec::new());
        assert_eq!(none.entitlement(&host_network), Entitlement::Nothing);
        assert_eq!(
            none.entitlement(&pod("kube-system", "aws-node", true, Some("cni"))),
            Entitlement::Policy,
            "a role named is a role given"
        );
    }

    #[test]
    fn a_named_service_account_gets_the_nodes_credentials_hostnetwork_or_not_unless_it_names_a_role() {
        let setting = NodeCredentials::new(HostNetworkCredentials::None, vec![aws_node()]);
        for host_network in [false, true] {
            assert_eq!(
                setting.entitlement(&pod("kube-system", "aws-node", host_network, None)),
                Entitlement::Node(Grant::ServiceAccount)
            );
        }
        assert_eq!(
            setting.entitlement(&pod("kube-system", "aws-node", false, Some("cni"))),
            Entitlement::Policy
        );
        for (namespace, account) in [("shop", "aws-node"), ("kube-system", "default")] {
            assert_eq!(
                setting.entitlement(&pod(namespace, account, false, None)),
                Entitlement::Policy,
                "{namespace}/{account}"
            );
        }
    }

    #[test]
    fn service_accounts_are_namespace_slash_name_as_kubernetes_spells_them() {
        assert_eq!(aws_node().to_string(), "kube-system/aws-node");
        assert!(ServiceAccountRef::parse("ns/a.b-c").is_ok());
        for bad in [
            "aws-node",
            "/aws-node",
            "kube-system/",
            "kube-system/aws-node/x",
            "Kube-System/aws-node",
            "kube-system/aws_node",
            "-ns/a",
            "ns/a..b",
            "ns/*",
            "",
        ] {
            let err = ServiceAccountRef::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let long = format!("ns/{}", vec!["a".repeat(63); 4].join("."));
        assert!(ServiceAccountRef::parse(&long).is_err(), "255 characters");
    }

    #[test]
    fn the_pods_served_are_counted_the_most_recent_first_and_bounded() {
        let setting = NodeCredentials::default();
        let first = pod("a", "x", true, None).pod.unwrap();
        let second = pod("b", "x", true, None).pod.unwrap();
        setting.served(&first, Grant::HostNetwork);
        setting.served(&second, Grant::HostNetwork);
        setting.served(&first, Grant::HostNetwork);
        let served = setting.pods_served();
        assert_eq!(
            served
                .iter()
                .map(|served| (served.pod.namespace.as_str(), served.answers))
                .collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        for index in 0..100 {
            let mut other = first.clone();
            other.uid = format!("uid-{index}");
            setting.served(&other, Grant::ServiceAccount);
        }
        let served = setting.pods_served();
        assert_eq!(served.len(), REMEMBERED_PODS.get());
        assert_eq!(served[0].pod.uid, "uid-99");
    }
}
