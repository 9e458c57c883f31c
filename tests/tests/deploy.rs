//! The Helm chart (deploy/helm/interceptor) and the kustomize base (deploy/kustomize/base), checked
//! offline with the venv's helm, kubectl and kubernetes-validate: lint, renders with the default values,
//! a kube2iam user's values and every option on, the schema refusing bad values, the base in step with
//! the chart, and every object valid for Kubernetes 1.35.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use interceptor::imds::node_credentials::HostNetworkCredentials;
use interceptor_tests::{
    chart::{
        by_kind_and_name, chart_dir, daemonset, env, output, parse_yaml, render, repo, run, strings,
        template, template_yaml, values_file,
    },
    kubelet,
    python::{has_kubectl, helm, kubectl, tool},
};
use serde_json::{Value, json};

/// The Kubernetes version the objects are validated against (the venv's kubectl's).
const KUBERNETES_VERSION: &str = "1.35.0";

/// The six capabilities and the rest of the agent's security context, wherever it runs.
fn assert_agent_security_context(container: &Value) {
    let context = &container["securityContext"];
    assert_eq!(context["runAsUser"], json!(0), "{context}");
    assert_eq!(context["privileged"], json!(false), "{context}");
    assert_eq!(context["allowPrivilegeEscalation"], json!(false), "{context}");
    assert_eq!(context["readOnlyRootFilesystem"], json!(true), "{context}");
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]), "{context}");
    let mut added = strings(&context["capabilities"]["add"]);
    added.sort();
    assert_eq!(added, ["DAC_READ_SEARCH", "NET_ADMIN", "SYS_ADMIN"], "{context}");
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|mount| mount["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}: {mounts:?}"))
    };
    assert_eq!(mount("/sys/fs/cgroup")["readOnly"], json!(true));
    // Bidirectional would need a privileged container.
    assert_eq!(mount("/sys/fs/bpf")["mountPropagation"], json!("HostToContainer"));
    mount("/tmp");
}

/// No object anywhere asks for a privileged container.
fn assert_nothing_privileged(yaml: &str) {
    assert!(
        !yaml.contains("privileged: true"),
        "a privileged container:\n{yaml}"
    );
}

/// The agent's container in a rendered set, after checking the DaemonSet's pod spec.
fn agent_container(objects: &BTreeMap<String, Value>, name: &str) -> Value {
    let daemonset = daemonset(objects, name);
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], json!(true));
    assert_eq!(spec["dnsPolicy"], json!("ClusterFirstWithHostNet"));
    assert_eq!(spec["priorityClassName"], json!("system-node-critical"));
    assert!(
        spec["tolerations"]
            .as_array()
            .expect("tolerations")
            .contains(&json!({"operator": "Exists"})),
        "{spec}"
    );
    // Never two agents on a node: a rolling update without surge, or kube2iam's OnDelete.
    let strategy = &daemonset["spec"]["updateStrategy"];
    match strategy["type"].as_str() {
        Some("RollingUpdate") => assert_eq!(strategy["rollingUpdate"]["maxSurge"], json!(0), "{strategy}"),
        other => assert_eq!(other, Some("OnDelete"), "{strategy}"),
    }
    let volumes = spec["volumes"].as_array().expect("volumes");
    let host_path = |path: &str| {
        volumes
            .iter()
            .find(|volume| volume["hostPath"]["path"] == path)
            .unwrap_or_else(|| panic!("no hostPath {path}: {volumes:?}"))["hostPath"]["type"]
            .clone()
    };
    assert_eq!(host_path("/sys/fs/cgroup"), json!("Directory"));
    assert_eq!(host_path("/sys/fs/bpf"), json!("DirectoryOrCreate"));
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{containers:?}");
    let container = containers[0].clone();
    assert_eq!(container["name"], json!("interceptor"));
    assert_agent_security_context(&container);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            container[probe]["httpGet"],
            json!({"path": path, "port": "metrics"}),
            "{probe}"
        );
    }
    container
}

/// The ClusterRole's rules, in the chart's order, for the three switches that add one each.
fn cluster_role_rules(namespace_restrictions: bool, serviceaccount_roles: bool, node_taint: bool) -> Value {
    let core =
        |resource: &str, verbs: &[&str]| json!({"apiGroups": [""], "resources": [resource], "verbs": verbs});
    let mut rules = vec![core("pods", &["list", "watch"])];
    if namespace_restrictions {
        rules.push(core("namespaces", &["list", "watch"]));
    }
    if serviceaccount_roles {
        rules.push(core("serviceaccounts", &["list", "watch"]));
    }
    rules.push(json!({"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}));
    if node_taint {
        rules.push(core("nodes", &["get", "patch"]));
    }
    json!(rules)
}

/// The ClusterRole `name` has exactly `rules`, and its binding names it and the ServiceAccount
/// `account`.
fn assert_rbac(objects: &BTreeMap<String, Value>, name: &str, account: &str, rules: Value) {
    let role = &objects[&format!("ClusterRole/{name}")];
    assert_eq!(role["rules"], rules);
    let binding = &objects[&format!("ClusterRoleBinding/{name}")];
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}])
    );
}

fn env_with(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

#[test]
fn helm_lint_strict_passes_with_default_kube2iam_and_all_on_values() -> Result<()> {
    if !has_kubectl("helm lint") {
        return Ok(());
    }
    for values in [
        None,
        Some("kube2iam-values.yaml"),
        Some("all-on-values.yaml"),
        Some("uninstall-values.yaml"),
    ] {
        let mut command = Command::new(helm()?);
        command.args(["lint", "--strict"]).arg(chart_dir());
        if let Some(values) = values {
            command.arg("--values").arg(values_file(values));
        }
        let out = run(&mut command)?;
        assert!(out.contains("0 chart(s) failed"), "{values:?}: {out}");
    }
    Ok(())
}

#[test]
fn default_values_render_the_agent_daemonset_with_three_capabilities_and_the_readme_rbac() -> Result<()> {
    if !has_kubectl("default render") {
        return Ok(());
    }
    let yaml = template_yaml(&[])?;
    assert_nothing_privileged(&yaml);
    let objects = by_kind_and_name(parse_yaml(&yaml)?);
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        [
            "ClusterRole/interceptor",
            "ClusterRoleBinding/interceptor",
            "DaemonSet/interceptor",
            "ServiceAccount/interceptor"
        ]
    );
    let container = agent_container(&objects, "interceptor");
    assert_eq!(container["image"], json!("interceptor:0.1.0"));
    assert_eq!(
        strings(&container["args"]),
        [
            "agent",
            "--log-format=json",
            "--agent-addr=$(HOST_IP):8181",
            "--metrics-addr=0.0.0.0:9181",
            "--bpffs-dir=/sys/fs/bpf/interceptor",
        ]
    );
    assert_eq!(
        env(&container),
        env_with(&[
            ("HOST_IP", "fieldRef:status.hostIP"),
            ("NODE_NAME", "fieldRef:spec.nodeName")
        ])
    );
    assert_eq!(
        container["ports"],
        json!([
            {"name": "metadata", "containerPort": 8181, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9181, "protocol": "TCP"},
        ])
    );
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "50m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}})
    );
    let daemonset = daemonset(&objects, "interceptor");
    assert_eq!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        json!(1)
    );
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        json!("interceptor")
    );
    assert_rbac(
        &objects,
        "interceptor",
        "interceptor",
        cluster_role_rules(false, false, false),
    );
    println!(
        "the DaemonSet's securityContext:\n{}",
        serde_json::to_string_pretty(&container["securityContext"])?
    );
    Ok(())
}

#[test]
fn kube2iam_values_map_to_our_flags_and_notes() -> Result<()> {
    if !has_kubectl("kube2iam values") {
        return Ok(());
    }
    let kube2iam = values_file("kube2iam-values.yaml");
    let yaml = template_yaml(&["--values", &kube2iam])?;
    assert_nothing_privileged(&yaml);
    let objects = by_kind_and_name(parse_yaml(&yaml)?);
    let container = agent_container(&objects, "interceptor");
    let args = strings(&container["args"]);
    assert_eq!(
        args,
        [
            "agent",
            "--log-format=json",
            "--agent-addr=$(HOST_IP):8181",
            "--metrics-addr=0.0.0.0:9181",
            "--bpffs-dir=/sys/fs/bpf/interceptor",
            "--auto-discover-base-arn",
            "--auto-discover-default-role",
        ]
    );
    assert!(
        !args
            .iter()
            .any(|arg| arg.contains("iptables") || arg.contains("host-interface")),
        "{args:?}"
    );
    assert_eq!(
        env(&container),
        env_with(&[
            ("HOST_IP", "fieldRef:status.hostIP"),
            ("NODE_NAME", "fieldRef:spec.nodeName"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ])
    );
    assert_rbac(
        &objects,
        "interceptor",
        "interceptor",
        cluster_role_rules(false, false, false),
    );

    // NOTES.txt: one line each for host.iptables and host.interface (rendered without a cluster).
    let notes = notes_of(&["--values", &kube2iam])?;
    assert!(notes.contains("host.iptables: not needed here"), "{notes}");
    assert!(
        notes.contains("host.interface (eni+): not needed here"),
        "{notes}"
    );
    assert!(notes.contains("uninstall.enabled=true"), "{notes}");
    Ok(())
}

/// kube2iam's whole values file, as `helm get values -a` of a kube2iam release prints it
/// (tests/fixtures/kube2iam-release-values.yaml), less its `image` block, written as JSON (which Helm
/// reads as YAML).
fn kube2iam_release_values_without_image(dir: &Path) -> Result<String> {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/kube2iam-release-values.yaml"))?;
    let mut values = parse_yaml(&text)?.remove(0);
    values
        .as_object_mut()
        .context("the values file is a map")?
        .remove("image")
        .context("the values file has an image block")?;
    let path = dir.join("kube2iam-release-values.json");
    std::fs::write(&path, serde_json::to_string(&values)?)?;
    Ok(path.display().to_string())
}

/// `helm install --dry-run` without a cluster: what it prints after NOTES.
fn notes_of(values: &[&str]) -> Result<String> {
    let install = run(Command::new(helm()?)
        .env("KUBECONFIG", "/nonexistent")
        .args(["install", "interceptor"])
        .arg(chart_dir())
        .args(["--namespace", "kube-system", "--dry-run=client"])
        .args(values))?;
    Ok(install.split("NOTES:").nth(1).context("no NOTES")?.to_owned())
}

#[test]
fn kube2iams_whole_values_file_installs_our_agent_and_names_what_it_ignores() -> Result<()> {
    if !has_kubectl("kube2iam's whole values file") {
        return Ok(());
    }
    // As it is, its image is kube2iam's: refused, saying what to remove.
    let fixture = repo().join("tests/fixtures/kube2iam-release-values.yaml");
    let stderr = template_refused(&["--values", &fixture.display().to_string()])?;
    assert!(
        stderr.contains("jtblin/kube2iam") && stderr.contains("remove the image block"),
        "{stderr}"
    );

    let dir = tempfile::tempdir()?;
    let values = kube2iam_release_values_without_image(dir.path())?;
    let yaml = template_yaml(&["--values", &values])?;
    assert_nothing_privileged(&yaml);
    validate("kube2iam-release", &yaml, dir.path())?;
    let objects = by_kind_and_name(parse_yaml(&yaml)?);
    // Our image, our security context, our placement (agent_container checks the priority class and
    // the tolerations kube2iam's empty values would have dropped), our probes, no preStop hook.
    let container = agent_container(&objects, "interceptor");
    assert_eq!(container["image"], json!("interceptor:0.1.0"));
    assert_agent_security_context(&container);
    assert_eq!(container["lifecycle"], Value::Null, "{container}");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // kube2iam's `resources: {}` keeps the chart's requests and limits.
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "50m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}})
    );
    assert_eq!(
        strings(&container["args"]),
        [
            "agent",
            "--log-format=json",
            "--agent-addr=$(HOST_IP):8181",
            "--metrics-addr=0.0.0.0:9181",
            "--bpffs-dir=/sys/fs/bpf/interceptor",
            "--auto-discover-base-arn",
            "--auto-discover-default-role",
        ]
    );
    let env = env(&container);
    assert_eq!(env.get("AWS_REGION").map(String::as_str), Some("us-east-1"));
    assert!(
        !env.keys()
            .any(|name| name.starts_with("AWS_ACCESS") || name.starts_with("AWS_SECRET")),
        "{env:?}"
    );
    let spec = &daemonset(&objects, "interceptor")["spec"];
    assert_eq!(spec["updateStrategy"], json!({"type": "OnDelete"}));
    assert_eq!(
        spec["template"]["spec"]["tolerations"],
        json!([{"operator": "Exists"}])
    );

    let notes = notes_of(&["--values", &values])?;
    for ignored in [
        "existingSecret",
        "lifecycle",
        "livenessProbe",
        "podSecurityPolicy",
        "readinessProbe",
        "aws.access_key",
        "aws.secret_key",
        "host.ip",
    ] {
        assert!(notes.contains(&format!("  - {ignored} (")), "{ignored}: {notes}");
    }
    assert!(notes.contains("tolerations: [] keeps the chart's"), "{notes}");
    assert!(
        notes.contains("priorityClassName: \"\" keeps the chart's"),
        "{notes}"
    );
    // Our own values name none of these.
    let ours = notes_of(&[])?;
    assert!(
        !ours.contains("kube2iam values ignored") && !ours.contains("keeps the chart's"),
        "{ours}"
    );
    Ok(())
}

#[test]
fn kube2iams_keys_that_mean_something_here_map_to_ours() -> Result<()> {
    if !has_kubectl("kube2iam's mapped keys") {
        return Ok(());
    }
    let objects = render(&[
        "--set",
        "prometheus.metricsPort=9543,prometheus.serviceMonitor.enabled=true,prometheus.serviceMonitor.interval=10s,\
         prometheus.serviceMonitor.namespace=monitoring,prometheus.serviceMonitor.labels.release=prom,\
         prometheus.service.enabled=true,\
         verbose=true,image.pullSecrets={registry-a},imagePullSecrets[0].name=registry-b,\
         updateStrategy=RollingUpdate,maxUnavailable=2,host.port=8282",
        "--set-string",
        "prometheus.service.annotations.prometheus\\.io/scrape=true",
    ])?;
    let container = agent_container(&objects, "interceptor");
    let args = strings(&container["args"]);
    assert!(
        args.contains(&"--metrics-addr=0.0.0.0:9543".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--agent-addr=$(HOST_IP):8282".to_owned()),
        "{args:?}"
    );
    assert!(args.contains(&"--verbose".to_owned()), "{args:?}");
    let spec = &daemonset(&objects, "interceptor")["spec"];
    assert_eq!(
        spec["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2, "maxSurge": 0}})
    );
    assert_eq!(
        spec["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "registry-b"}, {"name": "registry-a"}])
    );
    let monitor = &objects["ServiceMonitor/interceptor"];
    assert_eq!(monitor["metadata"]["namespace"], "monitoring");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "10s");
    let service = &objects["Service/interceptor-metrics"];
    assert_eq!(service["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(service["spec"]["ports"][0]["port"], 9543);

    // kube2iam's top-level maxUnavailable applies unless the chart's own updateStrategy.maxUnavailable
    // is set too, which wins (deploy/README.md's table).
    for (values, expected) in [
        ("updateStrategy=RollingUpdate,maxUnavailable=3", 3),
        ("updateStrategy.maxUnavailable=2,maxUnavailable=3", 2),
    ] {
        let objects = render(&["--set", values])?;
        let strategy = &daemonset(&objects, "interceptor")["spec"]["updateStrategy"];
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"], expected,
            "{values}: {strategy}"
        );
    }

    // kube2iam served metrics on its agent port by default; interceptor cannot.
    let stderr = template_refused(&["--set", "prometheus.metricsPort=8181"])?;
    assert!(
        stderr.contains("serves metrics and health on a port of their own"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn every_option_on_renders_monitors_service_and_the_uninstall_daemonset() -> Result<()> {
    if !has_kubectl("all-on render") {
        return Ok(());
    }
    let yaml = template_yaml(&["--values", &values_file("all-on-values.yaml")])?;
    assert_nothing_privileged(&yaml);
    let objects = by_kind_and_name(parse_yaml(&yaml)?);
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        [
            "ClusterRole/iam-agent",
            "ClusterRoleBinding/iam-agent",
            "ConfigMap/iam-agent-dashboard",
            "DaemonSet/iam-agent",
            "PodMonitor/iam-agent",
            "PrometheusRule/iam-agent",
            "Service/iam-agent-metrics",
            "ServiceAccount/iam-agent-sa",
            "ServiceMonitor/iam-agent",
        ]
    );
    let dashboard = &objects["ConfigMap/iam-agent-dashboard"];
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboard["metadata"]["labels"]["team"], "platform");
    let model: Value =
        serde_json::from_str(dashboard["data"]["interceptor.json"].as_str().unwrap_or_default())?;
    assert_eq!(model["uid"], "interceptor");
    let container = agent_container(&objects, "iam-agent");
    assert_eq!(
        container["image"],
        json!("registry.example.com/platform/interceptor:0.1.0-rc1")
    );
    assert_eq!(
        strings(&container["args"]),
        [
            "agent",
            "--log-format=json",
            "--agent-addr=$(HOST_IP):8282",
            "--metrics-addr=0.0.0.0:9282",
            "--bpffs-dir=/sys/fs/bpf/interceptor",
            "--cgroup-root=/sys/fs/cgroup/kubepods.slice",
            "--remove-node-taint=example.com/iam-agent-not-ready",
            "--host-network-credentials=none",
            "--node-credentials-for=kube-system/aws-node,kube-system/ebs-csi-node-sa",
            "--session-tags",
            "--cluster-name=prod-eu",
            "--session-tags-transitive",
            "--base-role-arn=arn:aws:iam::123456789012:role/",
            "--default-role=fallback",
            "--iam-role-session-ttl=30m",
            "--log-level=debug",
            "--namespace-restrictions",
            "--serviceaccount-roles",
        ]
    );
    assert_eq!(env(&container)["AWS_REGION"], "eu-west-1");
    assert_eq!(env(&container)["RUST_BACKTRACE"], "1");
    assert_rbac(
        &objects,
        "iam-agent",
        "iam-agent-sa",
        cluster_role_rules(true, true, true),
    );
    let service = &objects["Service/iam-agent-metrics"];
    assert_eq!(service["spec"]["clusterIP"], json!("None"));
    let monitor_selector = &objects["ServiceMonitor/iam-agent"]["spec"]["selector"]["matchLabels"];
    for (key, value) in monitor_selector.as_object().expect("matchLabels") {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    let pod_labels = &daemonset(&objects, "iam-agent")["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&pod_labels[key], value, "{key}");
    }
    for (key, value) in objects["PodMonitor/iam-agent"]["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&pod_labels[key], value, "{key}");
    }

    // The uninstall DaemonSet replaces the agent's: never both on a node.
    let objects = by_kind_and_name(template(&["--values", &values_file("uninstall-values.yaml")])?);
    assert!(!objects.contains_key("DaemonSet/interceptor"), "{objects:?}");
    let spec = &daemonset(&objects, "interceptor-uninstall")["spec"]["template"]["spec"];
    let init = &spec["initContainers"][0];
    assert_eq!(
        strings(&init["args"]),
        ["uninstall", "--bpffs-dir=/sys/fs/bpf/interceptor"]
    );
    assert_agent_security_context(init);
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]), "{spec}");
    Ok(())
}

#[test]
fn bad_values_are_rejected_by_the_schema() -> Result<()> {
    if !has_kubectl("schema") {
        return Ok(());
    }
    for (set, why) in [
        ("host.port=notaport", "/host/port"),
        ("host.port=70000", "/host/port"),
        ("hostt.port=8181", "hostt"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("rbac.create=yes", "/rbac/create"),
        ("extraArgs.--default-role=x", "--default-role"),
        ("updateStrategy.maxSurge=1", "maxSurge"),
        ("aws.region=us-east", "/aws/region"),
        ("nodeTaint.remove=yes", "/nodeTaint/remove"),
        ("nodeTaint.key=not a key", "/nodeTaint/key"),
        // The ClusterRole follows these flags: only spellings the chart and the agent read alike.
        (
            "extraArgs.namespace-restrictions=yes",
            "/extraArgs/namespace-restrictions",
        ),
        (
            "extraArgs.serviceaccount-roles=1",
            "/extraArgs/serviceaccount-roles",
        ),
        // The taint's flag, and the environment variables of all three, would bypass the rules.
        (
            "extraArgs.remove-node-taint=example.com/not-ready",
            "/extraArgs/remove-node-taint",
        ),
        (
            "extraEnv.INTERCEPTOR_NAMESPACE_RESTRICTIONS=true",
            "/extraEnv/INTERCEPTOR_NAMESPACE_RESTRICTIONS",
        ),
        (
            "extraEnv.INTERCEPTOR_SERVICEACCOUNT_ROLES=true",
            "/extraEnv/INTERCEPTOR_SERVICEACCOUNT_ROLES",
        ),
        (
            "extraEnv.INTERCEPTOR_REMOVE_NODE_TAINT=x",
            "/extraEnv/INTERCEPTOR_REMOVE_NODE_TAINT",
        ),
        ("hostNetworkCredentials=all", "/hostNetworkCredentials"),
        ("hostNetworkCredentials=true", "/hostNetworkCredentials"),
        ("nodeCredentialsFor={kube-system}", "/nodeCredentialsFor/0"),
        (
            "nodeCredentialsFor={Kube-System/aws-node}",
            "/nodeCredentialsFor/0",
        ),
        (
            "nodeCredentialsFor={kube-system/aws-node/x}",
            "/nodeCredentialsFor/0",
        ),
        (
            "nodeCredentialsFor={kube-system/aws-node,kube-system/aws-node}",
            "/nodeCredentialsFor",
        ),
        ("nodeCredentialsFor=kube-system/aws-node", "/nodeCredentialsFor"),
        ("sessionTags.enabled=yes", "/sessionTags/enabled"),
        ("sessionTags.always=true", "always"),
        ("clusterName=prod;eu", "/clusterName"),
        ("extraArgs.session-tags=true", "/extraArgs/session-tags"),
        ("extraArgs.cluster-name=prod", "/extraArgs/cluster-name"),
        ("prometheusRule.for.sts=ten minutes", "/prometheusRule/for/sts"),
        (
            "prometheusRule.refusalReasons=.*",
            "/prometheusRule/refusalReasons",
        ),
        ("prometheusRule.enable=true", "enable"),
        // What a values file could do to every node at once.
        ("updateStrategy.maxUnavailable=100%", "/updateStrategy"),
        ("maxUnavailable=50%", "/maxUnavailable"),
        ("resources.limits.memory=128", "/resources/limits/memory"),
        ("resources.requests.memory=64", "/resources/requests/memory"),
        ("updateStrategy=Recreate", "/updateStrategy"),
        ("extraArgs.agent-addr=10.0.0.1:80", "/extraArgs/agent-addr"),
        ("extraArgs.metrics-port=9999", "/extraArgs/metrics-port"),
        ("extraArgs.bpffs-dir=/tmp", "/extraArgs/bpffs-dir"),
        ("extraArgs.log-format=text", "/extraArgs/log-format"),
        ("image.digest=latest", "/image/digest"),
        ("extraVolumes[0].name=cgroup", "/extraVolumes/0/name"),
        (
            "extraVolumeMounts[0].name=x,extraVolumeMounts[0].mountPath=/sys/fs/bpf",
            "/extraVolumeMounts/0/mountPath",
        ),
        (
            "extraVolumeMounts[0].name=x,extraVolumeMounts[0].mountPath=relative",
            "/extraVolumeMounts/0/mountPath",
        ),
        (
            "terminationGracePeriodSeconds=5",
            "/terminationGracePeriodSeconds",
        ),
        ("dnsPolicy=Sometimes", "/dnsPolicy"),
        ("minReadySeconds=-1", "/minReadySeconds"),
    ] {
        let stderr = template_refused(&["--set", set])?;
        assert!(
            stderr.contains("schema") && stderr.contains(why),
            "{set}: {stderr}"
        );
    }
    Ok(())
}

/// How a values file or `--set` may switch a boolean flag of `extraArgs` on: true, "true", "".
const ON: [(&str, &str); 3] = [("--set", "true"), ("--set-string", "true"), ("--set-string", "")];
/// And off: absent, false, "false".
const OFF: [(&str, &str); 3] = [("", ""), ("--set", "false"), ("--set-string", "false")];

/// `helm template` arguments that switch extraArgs' `flag` `on` or off, in spelling `spelling` (of 3).
fn switch(flag: &str, on: bool, spelling: usize) -> Vec<String> {
    let (how, value) = if on { ON[spelling % 3] } else { OFF[spelling % 3] };
    match how {
        "" => Vec::new(),
        how => vec![how.to_owned(), format!("extraArgs.{flag}={value}")],
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_each_combination_of_flags_uses() -> Result<()> {
    if !has_kubectl("RBAC per flag") {
        return Ok(());
    }
    for combination in 0..8_usize {
        let (namespaces, accounts, taint) =
            (combination & 1 != 0, combination & 2 != 0, combination & 4 != 0);
        let mut args = switch("namespace-restrictions", namespaces, combination);
        args.extend(switch("serviceaccount-roles", accounts, combination));
        args.extend(["--set".to_owned(), format!("nodeTaint.remove={taint}")]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let objects = by_kind_and_name(template(&args)?);
        let role = &objects["ClusterRole/interceptor"];
        assert_eq!(
            role["rules"],
            cluster_role_rules(namespaces, accounts, taint),
            "{args:?}"
        );
        // The agent reads the rendered args as the chart reads the values.
        let container = &daemonset(&objects, "interceptor")["spec"]["template"]["spec"]["containers"][0];
        let agent = parse_agent_args(container, "10.0.1.23")?;
        assert_eq!(
            (
                agent.namespace_restrictions,
                agent.serviceaccount_roles,
                agent.remove_node_taint.is_some()
            ),
            (namespaces, accounts, taint),
            "{args:?}"
        );
    }
    Ok(())
}

#[test]
fn host_network_credentials_and_node_credentials_for_render_their_flags() -> Result<()> {
    if !has_kubectl("node credentials values") {
        return Ok(());
    }
    let args_of = |values: &[&str]| rendered_flags(values, &[""]);
    let flags = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .filter(|arg| {
                arg.starts_with("--host-network-credentials") || arg.starts_with("--node-credentials-for")
            })
            .collect()
    };
    // The defaults render neither: the agent's own defaults apply.
    assert_eq!(flags(args_of(&[])?), Vec::<String>::new());
    for setting in ["node", "default-role", "none"] {
        assert_eq!(
            flags(args_of(&["--set", &format!("hostNetworkCredentials={setting}")])?),
            [format!("--host-network-credentials={setting}")]
        );
    }
    let values = tempfile::NamedTempFile::new()?;
    std::fs::write(
        values.path(),
        "hostNetworkCredentials: none\nnodeCredentialsFor:\n  - kube-system/aws-node\n  - kube-system/ebs-csi-node-sa\n",
    )?;
    let args = args_of(&["--values", &values.path().display().to_string()])?;
    assert_eq!(
        flags(args.clone()),
        [
            "--host-network-credentials=none",
            "--node-credentials-for=kube-system/aws-node,kube-system/ebs-csi-node-sa"
        ]
    );
    // After the chart's own flags, before extraArgs.
    let position = |prefix: &str| args.iter().position(|arg| arg.starts_with(prefix));
    assert!(
        position("--bpffs-dir") < position("--host-network-credentials"),
        "{args:?}"
    );
    assert_eq!(
        flags(args_of(&[
            "--set",
            "nodeCredentialsFor={monitoring/node-exporter}"
        ])?),
        ["--node-credentials-for=monitoring/node-exporter"]
    );
    Ok(())
}

#[test]
fn session_tag_values_render_their_flags() -> Result<()> {
    if !has_kubectl("session tag values") {
        return Ok(());
    }
    let flags = |values: &[&str]| rendered_flags(values, &["--session-tags", "--cluster-name"]);
    assert_eq!(flags(&[])?, Vec::<String>::new());
    assert_eq!(flags(&["--set", "sessionTags.enabled=true"])?, ["--session-tags"]);
    assert_eq!(
        flags(&[
            "--set",
            "sessionTags.enabled=true,sessionTags.transitive=true",
            "--set-string",
            "clusterName=prod eu-1"
        ])?,
        [
            "--session-tags",
            "--cluster-name=prod eu-1",
            "--session-tags-transitive"
        ]
    );
    // A cluster name alone would tag nothing: refused, not dropped.
    for set in ["clusterName=prod", "sessionTags.transitive=true"] {
        let stderr = template_refused(&["--set", set])?;
        assert!(stderr.contains("set sessionTags.enabled too"), "{set}: {stderr}");
    }
    Ok(())
}

/// The agent container's args that start with one of `prefixes` (`""`: all), as `helm template` with
/// `values` renders them, in order.
fn rendered_flags(values: &[&str], prefixes: &[&str]) -> Result<Vec<String>> {
    let objects = by_kind_and_name(template(values)?);
    let spec = &daemonset(&objects, "interceptor")["spec"]["template"]["spec"];
    let args = strings(&spec["containers"][0]["args"]);
    Ok(args
        .into_iter()
        .filter(|arg| prefixes.iter().any(|prefix| arg.starts_with(prefix)))
        .collect())
}

/// `helm template` with `args`, which must fail: what it printed on standard error.
fn template_refused(args: &[&str]) -> Result<String> {
    let out = output(
        Command::new(helm()?)
            .args(["template", "interceptor"])
            .arg(chart_dir())
            .args(args),
    )?;
    assert!(!out.status.success(), "{args:?} was accepted");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_pods_knobs_render_where_set_and_the_workload_file_mounts_from_a_config_map() -> Result<()> {
    if !has_kubectl("pod knobs") {
        return Ok(());
    }
    let digest = format!("sha256:{}", "ab".repeat(32));
    let objects = render(&[
        "--set",
        &format!(
            "image.digest={digest},dnsPolicy=Default,minReadySeconds=20,terminationGracePeriodSeconds=45,\
             extraVolumes[0].name=workloads,extraVolumes[0].configMap.name=interceptor-workloads,\
             extraVolumeMounts[0].name=workloads,extraVolumeMounts[0].mountPath=/etc/interceptor,\
             extraVolumeMounts[0].readOnly=true,extraArgs.workloads=/etc/interceptor/workloads.toml,\
             extraArgs.kubernetes=true"
        ),
    ])?;
    let daemonset = daemonset(&objects, "interceptor");
    let spec = &daemonset["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    assert_eq!(container["image"], json!(format!("interceptor@{digest}")));
    assert_eq!(spec["dnsPolicy"], "Default");
    assert_eq!(spec["terminationGracePeriodSeconds"], 45);
    assert_eq!(daemonset["spec"]["minReadySeconds"], 20);
    assert!(
        spec["volumes"].as_array().is_some_and(|volumes| volumes
            .contains(&json!({"name": "workloads", "configMap": {"name": "interceptor-workloads"}}))),
        "{spec}"
    );
    assert!(
        container["volumeMounts"].as_array().is_some_and(|mounts| mounts
            .contains(&json!({"name": "workloads", "mountPath": "/etc/interceptor", "readOnly": true}))),
        "{container}"
    );
    let args = strings(&container["args"]);
    assert!(
        args.contains(&"--workloads=/etc/interceptor/workloads.toml".to_owned()),
        "{args:?}"
    );

    // Unset, none of them is rendered: Kubernetes' defaults (and the kustomize base) apply.
    let defaults = render(&[])?;
    let default_daemonset = &defaults["DaemonSet/interceptor"];
    assert_eq!(default_daemonset["spec"]["minReadySeconds"], Value::Null);
    assert_eq!(
        default_daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        Value::Null
    );
    Ok(())
}

#[test]
fn apparmor_is_the_field_from_kubernetes_1_30_and_the_annotation_before() -> Result<()> {
    if !has_kubectl("AppArmor by Kubernetes version") {
        return Ok(());
    }
    for (version, field) in [("1.29.0", false), ("1.30.0", true), ("1.35.0", true)] {
        let objects = render(&["--kube-version", version, "--set", "uninstall.enabled=false"])?;
        let uninstall = render(&["--kube-version", version, "--set", "uninstall.enabled=true"])?;
        for (objects, name, container, path) in [
            (&objects, "interceptor", "interceptor", "containers"),
            (&uninstall, "interceptor-uninstall", "uninstall", "initContainers"),
        ] {
            let template = &daemonset(objects, name)["spec"]["template"];
            let annotation = &template["metadata"]["annotations"]
                [format!("container.apparmor.security.beta.kubernetes.io/{container}")];
            let profile = &template["spec"][path][0]["securityContext"]["appArmorProfile"];
            if field {
                assert_eq!(profile, &json!({"type": "Unconfined"}), "{version} {name}");
                assert_eq!(annotation, &Value::Null, "{version} {name}");
            } else {
                assert_eq!(profile, &Value::Null, "{version} {name}");
                assert_eq!(annotation, &json!("unconfined"), "{version} {name}");
            }
        }
    }
    let stderr = template_refused(&["--kube-version", "1.24.0"])?;
    assert!(
        stderr.contains("chart requires kubeVersion: >=1.25.0-0"),
        "{stderr}"
    );
    Ok(())
}

/// Helm's own labels, which the kustomize base leaves out.
fn without_helm_labels(mut object: Value) -> Value {
    fn strip(labels: &mut Value) {
        if let Some(labels) = labels.as_object_mut() {
            labels.remove("helm.sh/chart");
            labels.remove("app.kubernetes.io/managed-by");
        }
    }
    strip(&mut object["metadata"]["labels"]);
    if object["spec"]["template"]["metadata"]["labels"].is_object() {
        strip(&mut object["spec"]["template"]["metadata"]["labels"]);
    }
    object
}

#[test]
fn kustomize_base_equals_the_charts_default_render() -> Result<()> {
    if !has_kubectl("kustomize base") {
        return Ok(());
    }
    let base = run(Command::new(kubectl()?)
        .arg("kustomize")
        .arg(repo().join("deploy/kustomize/base")))?;
    assert_nothing_privileged(&base);
    let base = by_kind_and_name(parse_yaml(&base)?);
    let chart: BTreeMap<String, Value> = by_kind_and_name(template(&[])?)
        .into_iter()
        .map(|(key, object)| (key, without_helm_labels(object)))
        .collect();
    assert_eq!(base.keys().collect::<Vec<_>>(), chart.keys().collect::<Vec<_>>());
    for (key, object) in &chart {
        assert_eq!(
            &base[key], object,
            "{key} differs between deploy/kustomize/base and the chart's default render"
        );
    }
    Ok(())
}

/// `kubernetes-validate --strict` on every object of `yaml`, one file per document; the Prometheus
/// Operator's kinds, which it has no schema for, are only checked to be those.
fn validate(name: &str, yaml: &str, dir: &Path) -> Result<()> {
    let validator = tool("kubernetes-validate")?;
    for (index, object) in parse_yaml(yaml)?.into_iter().enumerate() {
        let file = dir.join(format!("{name}-{index}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&object)?)?;
        let out = output(
            Command::new(&validator)
                .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
                .arg(&file),
        )?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "{name}: {object}\n{said}");
        if object["apiVersion"] == "monitoring.coreos.com/v1" {
            ensure!(said.contains("Couldn't find schema"), "{name}: {said}");
            continue;
        }
        ensure!(
            said.contains("passed") && !said.contains("WARN"),
            "{name}: {said}"
        );
    }
    Ok(())
}

#[test]
fn every_rendered_object_passes_kubernetes_validate_strict() -> Result<()> {
    if !has_kubectl("kubernetes-validate") {
        return Ok(());
    }
    if tool("kubernetes-validate").is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("kubernetes-validate is missing from the venv: run `cargo xtask test`");
        }
        eprintln!("skipping kubernetes-validate: not in the venv (run `cargo xtask test`)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    for (name, values) in [
        ("default", None),
        ("kube2iam", Some("kube2iam-values.yaml")),
        ("all-on", Some("all-on-values.yaml")),
        ("uninstall", Some("uninstall-values.yaml")),
    ] {
        let values = values.map(values_file);
        let args: Vec<&str> = match &values {
            Some(values) => vec!["--values", values],
            None => vec![],
        };
        validate(name, &template_yaml(&args)?, dir.path())?;
    }
    let base = run(Command::new(kubectl()?)
        .arg("kustomize")
        .arg(repo().join("deploy/kustomize/base")))?;
    validate("kustomize", &base, dir.path())
}

/// `interceptor agent`'s flags, as the binary parses them.
#[derive(clap::Parser)]
struct AgentCommand {
    #[command(subcommand)]
    command: AgentSubcommand,
}

#[derive(clap::Subcommand)]
enum AgentSubcommand {
    Agent(Box<interceptor::agent::AgentArgs>),
}

/// The agent container's args as the kubelet passes them: references expanded against its env, with
/// `host_ip` and `NODE_NAME` from the downward API.
fn parse_agent_args(container: &Value, host_ip: &str) -> Result<interceptor::agent::AgentArgs> {
    use clap::Parser;
    let fields = BTreeMap::from([
        ("status.hostIP".to_owned(), host_ip.to_owned()),
        ("spec.nodeName".to_owned(), "node-a".to_owned()),
    ]);
    let env = kubelet::container_env(container, &fields, &[])?;
    let argv = std::iter::once("interceptor".to_string()).chain(kubelet::container_args(container, &env));
    let AgentSubcommand::Agent(args) = AgentCommand::try_parse_from(argv)?.command;
    Ok(*args)
}

#[test]
fn rendered_args_parse_as_the_agents_own_flags() -> Result<()> {
    if !has_kubectl("rendered args") {
        return Ok(());
    }
    let host_ip = "10.0.1.23";
    let args_of = |values: Option<&str>, name: &str| -> Result<Value> {
        let values = values.map(values_file);
        let args: Vec<&str> = match &values {
            Some(values) => vec!["--values", values],
            None => vec![],
        };
        let objects = by_kind_and_name(template(&args)?);
        Ok(daemonset(&objects, name)["spec"]["template"]["spec"]["containers"][0].clone())
    };

    let default = parse_agent_args(&args_of(None, "interceptor")?, host_ip)?;
    assert_eq!(default.agent_addr, Some("10.0.1.23:8181".parse()?));
    assert_eq!(default.metrics_addr, Some("0.0.0.0:9181".parse()?));
    assert_eq!(default.bpffs_dir, Path::new("/sys/fs/bpf/interceptor"));
    assert_eq!(default.cgroup_root, None);
    assert!(!default.auto_discover_base_arn && !default.auto_discover_default_role);
    assert_eq!(default.remove_node_taint, None);

    let kube2iam = parse_agent_args(&args_of(Some("kube2iam-values.yaml"), "interceptor")?, host_ip)?;
    assert!(kube2iam.auto_discover_base_arn && kube2iam.auto_discover_default_role);

    let all_on = parse_agent_args(&args_of(Some("all-on-values.yaml"), "iam-agent")?, host_ip)?;
    assert_eq!(all_on.agent_addr, Some("10.0.1.23:8282".parse()?));
    assert_eq!(all_on.metrics_addr, Some("0.0.0.0:9282".parse()?));
    assert_eq!(
        all_on.cgroup_root.as_deref(),
        Some(Path::new("/sys/fs/cgroup/kubepods.slice"))
    );
    assert_eq!(
        all_on.base_role_arn.as_deref(),
        Some("arn:aws:iam::123456789012:role/")
    );
    assert_eq!(all_on.default_role.as_deref(), Some("fallback"));
    assert!(all_on.namespace_restrictions);
    assert_eq!(
        all_on.remove_node_taint.as_deref(),
        Some("example.com/iam-agent-not-ready")
    );
    assert_eq!(all_on.host_network_credentials, HostNetworkCredentials::None);
    let granted: Vec<String> = all_on
        .node_credentials_for
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(granted, ["kube-system/aws-node", "kube-system/ebs-csi-node-sa"]);
    assert_eq!(default.host_network_credentials, HostNetworkCredentials::Node);
    assert!(default.node_credentials_for.is_empty());
    Ok(())
}
