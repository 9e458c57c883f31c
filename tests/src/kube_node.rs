//! A simulated node in a cluster: the real agent with its Kubernetes source, the fake API server
//! (`kube_api`) in the node as the cluster's, the stand-in metadata service, and moto as STS when a test
//! needs credentials. Pods exist twice, as they do on a real node: as cgroups and network namespaces
//! on the node (`sim::Pod`), and as Pod objects the test applies to the API server.

use std::{collections::BTreeMap, ffi::OsString, path::PathBuf, process::Command};

use anyhow::Result;
use k8s_openapi::{
    api::core::v1::{Container, Namespace, Node, NodeSpec, Pod, PodSpec, PodStatus, ServiceAccount, Taint},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    agent::{Agent, BASE_ROLE_ARN, NO_STS},
    deployed::Sts,
    kube_api::FakeApiServer,
    lab::StandIn,
    moto::Moto,
    sim::{self, SimNode},
};

/// The node's name, as the DaemonSet's `NODE_NAME` has it.
pub const NODE_NAME: &str = "node-a";
/// Another node of the cluster: its pods are in no store of this node's agent.
pub const OTHER_NODE: &str = "node-b";

/// Fields drop in order: the agent first, the node last.
pub struct KubeNode {
    pub agent: Agent,
    agent_args: Vec<OsString>,
    pub api: FakeApiServer,
    pub moto: Option<Moto>,
    pub stand_in: StandIn,
    config_dir: tempfile::TempDir,
    pub node: SimNode,
}

impl KubeNode {
    /// Starts the stand-in, the API server, moto (unless STS is down) and the agent, with the flags of
    /// a DaemonSet on this node and `extra_args`, and waits until it is ready (its pods listed).
    pub fn start(node: SimNode, sts: Sts, extra_args: &[&str]) -> Result<Self> {
        Self::start_with(node, sts, extra_args, |_| {})
    }

    /// [`KubeNode::start`], with `setup` run on the API server before the agent starts (objects the
    /// agent must find there at once, such as its Node).
    pub fn start_with(
        node: SimNode,
        sts: Sts,
        extra_args: &[&str],
        setup: impl FnOnce(&FakeApiServer),
    ) -> Result<Self> {
        Self::start_until(node, sts, extra_args, setup, "ready")
    }

    /// [`KubeNode::start_with`], returning once the agent logged `message` (for an agent that may
    /// never be ready).
    pub fn start_until(
        node: SimNode,
        sts: Sts,
        extra_args: &[&str],
        setup: impl FnOnce(&FakeApiServer),
        message: &'static str,
    ) -> Result<Self> {
        let stand_in = StandIn::start(&node)?;
        let api = FakeApiServer::start(&node)?;
        setup(&api);
        let moto = match sts {
            Sts::Moto => Some(Moto::start(&node)?),
            Sts::Down => None,
        };
        let config_dir = tempfile::tempdir()?;
        let kubeconfig = config_dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let sts_url = moto.as_ref().map_or_else(|| NO_STS.to_owned(), Moto::url);
        let mut agent_args: Vec<OsString> = vec![
            "--agent-addr".into(),
            node.agent_v4().to_string().into(),
            "--cgroup-root".into(),
            node.kubepods().into(),
            "--sts-endpoint".into(),
            sts_url.into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--node".into(),
            NODE_NAME.into(),
        ];
        if !extra_args
            .iter()
            .any(|arg| arg.starts_with("--auto-discover-base-arn"))
        {
            agent_args.extend(["--base-role-arn".into(), BASE_ROLE_ARN.into()]);
        }
        agent_args.extend(extra_args.iter().map(OsString::from));
        let mut command = Agent::command(&node)?;
        command.args(&agent_args);
        let agent = Agent::start_until(command, message)?;
        Ok(Self {
            agent,
            agent_args,
            api,
            moto,
            stand_in,
            config_dir,
            node,
        })
    }

    /// The kubeconfig of the node's API server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.config_dir.path().join("kubeconfig")
    }

    /// The agent's command as [`KubeNode::start`] built it, to start it again differently.
    pub fn agent_command(&self) -> Result<Command> {
        let mut command = Agent::command(&self.node)?;
        command.args(&self.agent_args);
        Ok(command)
    }

    /// The node's moto; panics when the node was started with STS down.
    pub fn moto(&self) -> &Moto {
        self.moto.as_ref().expect("this node runs moto")
    }
}

/// The Pod object of a simulated pod: `namespace/name` on this node ([`NODE_NAME`]), with
/// `annotations`, Running.
pub fn pod_object(pod: &sim::Pod, namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Pod {
    let mut object = object_only_pod(namespace, name, annotations);
    object.metadata.uid = Some(pod.uid.clone());
    object
}

/// The Pod object of a simulated hostNetwork pod (`spec.hostNetwork: true`): `namespace/name` on this
/// node, running as `service_account`, with `annotations`, Running.
pub fn host_network_pod_object(
    pod: &sim::HostNetworkPod,
    namespace: &str,
    name: &str,
    service_account: &str,
    annotations: &[(&str, &str)],
) -> Pod {
    let mut object = object_only_pod(namespace, name, annotations);
    object.metadata.uid = Some(pod.uid.clone());
    let spec = object.spec.as_mut().expect("object_only_pod has a spec");
    spec.host_network = Some(true);
    spec.service_account_name = Some(service_account.to_owned());
    object
}

/// A Pod object with no pod on the node behind it (no cgroup, no network), as [`pod_object`] makes
/// one but without a UID: the API server gives it one.
pub fn object_only_pod(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .collect(),
            ),
            // Fields the agent does not read, as real pods carry them: the store must strip them.
            labels: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE_NAME.to_owned()),
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("registry.example/app:1".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            ..Default::default()
        }),
    }
}

/// The Node object of this node ([`NODE_NAME`]), with `taints` (key, value, effect).
pub fn node_object(taints: &[(&str, Option<&str>, &str)]) -> Node {
    Node {
        metadata: meta(NODE_NAME, None, &[]),
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(key, value, effect)| Taint {
                        key: (*key).to_owned(),
                        value: value.map(str::to_owned),
                        effect: (*effect).to_owned(),
                        time_added: None,
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A namespace with `annotations`.
pub fn namespace_object(name: &str, annotations: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: meta(name, None, annotations),
        ..Default::default()
    }
}

/// A ServiceAccount with `annotations`.
pub fn service_account_object(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(name, Some(namespace), annotations),
        ..Default::default()
    }
}

fn meta(name: &str, namespace: Option<&str>, annotations: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        annotations: Some(
            annotations
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}
