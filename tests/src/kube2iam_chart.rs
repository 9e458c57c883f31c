//! kube2iam's own Helm chart as users have it installed: what `helm template` renders from kube2iam's
//! chart 0.15.0 (github.com/jtblin/kube2iam, tag 0.15.0, `charts/kube2iam/templates/daemonset.yaml`
//! and `clusterrole.yaml`, with Chart.yaml's version and the image tag set to 0.15.0 as its release
//! job sets them) for the values named at each function. The chart is not part of this project: its
//! output is written out here, the parts of the pod spec the kubelet reads to start the container
//! (`kubelet::Kubelet::container`) and the ClusterRole's rules.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{Value, json};

/// The ServiceAccount the chart's pods run as with `rbac.create: true` (release `kube2iam`).
pub const SERVICE_ACCOUNT: &str = "kube2iam-kube2iam-chart";
/// The agent's container in the chart's pod spec.
pub const CONTAINER: &str = "kube2iam";

/// The values of the kube2iam blog post (our chart's `ci/kube2iam-values.yaml` is that file): `aws.region: us-east-1`, `extraArgs.auto-discover-base-arn: true`,
/// `extraArgs.auto-discover-default-role: true`, `host.iptables: true`, `host.interface: eni+`,
/// `rbac.create: true`.
pub fn blog_post_pod_spec() -> Value {
    pod_spec(
        &[
            "--host-interface=eni+",
            "--node=$(NODE_NAME)",
            "--host-ip=$(HOST_IP)",
            "--iptables=true",
            "--auto-discover-base-arn=true",
            "--auto-discover-default-role=true",
            "--app-port=8181",
            "--metrics-port=8181",
        ],
        &[json!({"name": "AWS_DEFAULT_REGION", "value": "us-east-1"})],
    )
}

/// A Calico cluster's values, with the default role discovered alone (which discovers the base ARN
/// too) and kube2iam's bare metadata address: `extraArgs.auto-discover-default-role: true`,
/// `extraArgs.metadata-addr: 169.254.169.254`, `host.iptables: true`, `host.interface: cali+`,
/// `verbose: true`, `rbac.create: true`.
pub fn calico_pod_spec() -> Value {
    pod_spec(
        &[
            "--host-interface=cali+",
            "--node=$(NODE_NAME)",
            "--host-ip=$(HOST_IP)",
            "--iptables=true",
            "--auto-discover-default-role=true",
            "--metadata-addr=169.254.169.254",
            "--verbose",
            "--app-port=8181",
            "--metrics-port=8181",
        ],
        &[],
    )
}

/// The chart's ClusterRole with `rbac.create: true`, whatever the other values.
pub fn cluster_role_rules() -> Vec<PolicyRule> {
    serde_json::from_value(json!([
        {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": ["list", "watch", "get"]}
    ]))
    .expect("valid rules")
}

/// The rendered pod spec with these `args` and the env entries after the two every render has.
fn pod_spec(args: &[&str], more_env: &[Value]) -> Value {
    let mut env = vec![
        json!({"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
    ];
    env.extend_from_slice(more_env);
    json!({
        "hostNetwork": true,
        "serviceAccountName": SERVICE_ACCOUNT,
        "containers": [{
            "name": CONTAINER,
            "image": "jtblin/kube2iam:0.15.0",
            "args": args,
            "env": env,
        }],
    })
}
