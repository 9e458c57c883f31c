//! The agent under the chart's RBAC. For each combination of the three switches the ClusterRole
//! follows (`extraArgs.namespace-restrictions`, `extraArgs.serviceaccount-roles`, `nodeTaint.remove`),
//! the chart's DaemonSet runs on the simulated node with the fake API server enforcing the ClusterRole
//! rendered with it (`daemonset_node`): the agent syncs, serves pods their roles, posts its Events and
//! removes its readiness taint; no request of its is refused, and every verb the ClusterRole grants is
//! one it used. And a rule missing for a flag shows, until it is granted: the agent is never ready, or
//! logs why it cannot do its part.

use std::collections::BTreeSet;

use anyhow::Result;
use interceptor_tests::{
    daemonset_node::{DEFAULT_VALUES, DaemonSetNode, DaemonSetSpec, can_run},
    deployed::{Sts, eventually, health, role_list, role_list_becomes},
    exposition::Samples,
    kube_api::FakeApiServer,
    kube_node::{KubeNode, NODE_NAME, namespace_object, node_object, pod_object, service_account_object},
    sim::SimNode,
};
use k8s_openapi::api::rbac::v1::PolicyRule;

const ROLE_KEY: &str = "iam.amazonaws.com/role";
const ALLOWED_ROLES_KEY: &str = "iam.amazonaws.com/allowed-roles";
/// The chart's default `nodeTaint.key`.
const READINESS_TAINT: &str = "interceptor.dev/agent-not-ready";
/// The namespace of the test's pods, whose restriction allows both roles they ask for.
const NAMESPACE: &str = "shop";

/// The three switches.
#[derive(Clone, Copy, Debug)]
struct Flags {
    namespace_restrictions: bool,
    serviceaccount_roles: bool,
    node_taint: bool,
}

impl Flags {
    /// The combination numbered `combination` (0 to 7), one bit per switch.
    fn numbered(combination: usize) -> Self {
        Self {
            namespace_restrictions: combination & 1 != 0,
            serviceaccount_roles: combination & 2 != 0,
            node_taint: combination & 4 != 0,
        }
    }

    /// The chart's values for this combination, on top of the README's `helm install`.
    fn values(self) -> Vec<String> {
        let mut values: Vec<String> = DEFAULT_VALUES.iter().map(|value| value.to_string()).collect();
        if self.namespace_restrictions {
            values.extend(["--set".into(), "extraArgs.namespace-restrictions=true".into()]);
        }
        if self.serviceaccount_roles {
            values.extend(["--set-string".into(), "extraArgs.serviceaccount-roles=".into()]);
        }
        values.extend(["--set".into(), format!("nodeTaint.remove={}", self.node_taint)]);
        values
    }
}

/// Every (API group, resource, verb) the rules grant.
fn granted(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

/// Every (API group, resource, verb) the agent asked the API server for, and the requests refused.
fn used(api: &FakeApiServer) -> (BTreeSet<(String, String, String)>, Vec<String>) {
    let requests = api.requests();
    let used = requests
        .iter()
        .filter_map(|request| request.rbac_attributes())
        .collect();
    let refused = requests
        .iter()
        .filter(|request| request.status == 403)
        .map(|request| format!("{} {} {:?}", request.method, request.path, request.query))
        .collect();
    (used, refused)
}

async fn taint_removed(api: &FakeApiServer) -> bool {
    eventually(|| async {
        let node = api.node(NODE_NAME).expect("the node is registered");
        node.spec
            .and_then(|spec| spec.taints)
            .unwrap_or_default()
            .is_empty()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_each_combination_of_flags_the_agent_does_its_work_with_exactly_the_charts_rbac() -> Result<()> {
    if !can_run("RBAC per flag, end to end") {
        return Ok(());
    }
    for combination in 0..8 {
        let flags = Flags::numbered(combination);
        println!("{flags:?}");
        let values = flags.values();
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let daemonset = DaemonSetSpec::chart(&values)?;
        let rules = daemonset
            .rules
            .clone()
            .expect("the chart renders its ClusterRole");
        let mut cluster = DaemonSetNode::start_with(SimNode::new()?, daemonset, |api| {
            // The kubelet registers its Node, with the readiness taint when the node group has it.
            let taints: &[_] = match flags.node_taint {
                true => &[(READINESS_TAINT, Some("true"), "NoSchedule")],
                false => &[],
            };
            api.apply_node(node_object(taints));
            api.apply_namespace(namespace_object(
                NAMESPACE,
                &[(ALLOWED_ROLES_KEY, r#"["app-*", "ci-*"]"#)],
            ));
            api.apply_service_account(service_account_object(
                NAMESPACE,
                "builder",
                &[(ROLE_KEY, "ci-builder")],
            ));
        })?;
        let (web, builder, bad) = (cluster.node.pod()?, cluster.node.pod()?, cluster.node.pod()?);
        cluster
            .api
            .apply_pod(pod_object(&web, NAMESPACE, "web", &[(ROLE_KEY, "app-web")]));
        let mut built = pod_object(&builder, NAMESPACE, "builder", &[]);
        built.spec.as_mut().expect("a spec").service_account_name = Some("builder".to_owned());
        cluster.api.apply_pod(built);
        cluster
            .api
            .apply_pod(pod_object(&bad, NAMESPACE, "bad", &[(ROLE_KEY, "../admin")]));

        // Pods (and, with restrictions, their namespace's allowed roles).
        assert!(
            role_list_becomes(&web, &web.container()?, (200, "app-web")).await,
            "{flags:?}"
        );
        // ServiceAccounts' roles.
        let (status, listed) = role_list(&builder, &builder.container()?).await?;
        match flags.serviceaccount_roles {
            true => assert_eq!((status, listed.as_str()), (200, "ci-builder"), "{flags:?}"),
            false => assert_eq!(status, 404, "{flags:?}: no role and no default: {listed}"),
        }
        // Events on a refused pod.
        assert_eq!(role_list(&bad, &bad.container()?).await?.0, 403, "{flags:?}");
        assert!(
            eventually(|| async {
                cluster
                    .api
                    .events()
                    .iter()
                    .any(|event| event["reason"] == "IAMRoleAnnotationInvalid")
            })
            .await,
            "{flags:?}: no Event"
        );
        // The readiness taint.
        if flags.node_taint {
            assert!(taint_removed(&cluster.api).await, "{flags:?}");
            cluster.agent.wait_for_log("node taint removed")?;
        }

        // The fake server logs a request once it has answered it: the Event can be in its store a
        // moment before its request is in the log.
        let granted = granted(&rules);
        eventually(|| async { used(&cluster.api).0 == granted }).await;
        let (used, refused) = used(&cluster.api);
        assert!(refused.is_empty(), "{flags:?}: refused {refused:#?}");
        assert_eq!(
            used, granted,
            "{flags:?}: what the agent used is what the chart grants"
        );
    }
    Ok(())
}

/// The user the rules are enforced for in the tests that run the agent without the DaemonSet.
const USER: &str = "system:serviceaccount:kube-system:interceptor";

/// The chart's ClusterRole rules for `flags`.
fn chart_rules(flags: Flags) -> Result<Vec<PolicyRule>> {
    let values = flags.values();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    Ok(DaemonSetSpec::chart(&values)?
        .rules
        .expect("the chart renders its ClusterRole"))
}

/// `rules` without those on `resource`.
fn without(mut rules: Vec<PolicyRule>, resource: &str) -> Vec<PolicyRule> {
    rules.retain(|rule| !rule.resources.iter().flatten().any(|listed| listed == resource));
    rules
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_rule_a_reflector_needs_the_agent_is_never_ready_until_it_is_granted() -> Result<()> {
    if !can_run("RBAC, a reflector's rule missing") {
        return Ok(());
    }
    for (flag, resource) in [
        ("", "pods"),
        ("--namespace-restrictions", "namespaces"),
        ("--serviceaccount-roles", "serviceaccounts"),
    ] {
        let args: &[&str] = match flag {
            "" => &[],
            flag => &[flag],
        };
        let flags = Flags {
            namespace_restrictions: resource == "namespaces",
            serviceaccount_roles: resource == "serviceaccounts",
            node_taint: false,
        };
        let missing = without(chart_rules(flags)?, resource);
        let cluster = KubeNode::start_until(
            SimNode::new()?,
            Sts::Down,
            args,
            |api| api.enforce_rbac(USER, missing),
            "Kubernetes API",
        )?;
        let path = format!("/api/v1/{resource}");
        let refused = || {
            let requests = cluster.api.requests().into_iter();
            requests
                .filter(|request| request.path == path && request.status == 403)
                .count()
        };
        assert!(
            eventually(|| async { refused() >= 2 }).await,
            "{resource}: the agent keeps trying to list them"
        );
        assert_eq!(health(&cluster.node, "/readyz").await?.0, 503, "{resource}");
        let (_, metrics) = health(&cluster.node, "/metrics").await?;
        let errors = Samples::parse(&metrics)?.get(&format!(
            "interceptor_kubernetes_watch_errors_total{{resource=\"{resource}\"}}"
        ));
        assert!(errors >= 1.0, "{resource}: {errors} watch errors");
        assert!(
            !cluster
                .agent
                .logs()
                .iter()
                .any(|line| line.contains(r#""message":"ready""#)),
            "{resource}: the agent is not ready"
        );

        cluster.api.enforce_rbac(USER, chart_rules(flags)?);
        cluster.agent.wait_for_log(r#""message":"ready""#)?;
        assert_eq!(health(&cluster.node, "/readyz").await?.0, 200, "{resource}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_node_or_event_rules_the_agent_serves_and_logs_why_it_cannot_do_those() -> Result<()> {
    if !can_run("RBAC, node and event rules missing") {
        return Ok(());
    }
    let flags = Flags {
        namespace_restrictions: false,
        serviceaccount_roles: false,
        node_taint: true,
    };
    let missing = without(without(chart_rules(flags)?, "nodes"), "events");
    let mut node = SimNode::new()?;
    let (web, bad) = (node.pod()?, node.pod()?);
    let cluster = KubeNode::start_with(
        node,
        Sts::Down,
        &["--remove-node-taint", READINESS_TAINT],
        |api| {
            api.enforce_rbac(USER, missing);
            api.apply_node(node_object(&[(READINESS_TAINT, Some("true"), "NoSchedule")]));
        },
    )?;
    cluster
        .api
        .apply_pod(pod_object(&web, NAMESPACE, "web", &[(ROLE_KEY, "app-web")]));
    cluster
        .api
        .apply_pod(pod_object(&bad, NAMESPACE, "bad", &[(ROLE_KEY, "../admin")]));
    assert!(role_list_becomes(&web, &web.container()?, (200, "app-web")).await);

    // The taint stays, and each attempt says why.
    let forbidden_attempt =
        |line: &str| line.contains("cannot remove the node taint") && line.contains("is forbidden");
    cluster
        .agent
        .wait_for_line("a refused taint removal", forbidden_attempt)?;
    let node_taints = |api: &FakeApiServer| {
        let node = api.node(NODE_NAME).expect("registered");
        node.spec.and_then(|spec| spec.taints).unwrap_or_default().len()
    };
    assert_eq!(node_taints(&cluster.api), 1);
    // The refused pod's Event is not posted, and the log says why.
    assert_eq!(role_list(&bad, &bad.container()?).await?.0, 403);
    cluster.agent.wait_for_line("a refused Event", |line| {
        line.contains("cannot post event") && line.contains("is forbidden")
    })?;
    assert!(cluster.api.events().is_empty());

    // Granted, the next attempt removes the taint.
    cluster.api.enforce_rbac(USER, chart_rules(flags)?);
    assert!(taint_removed(&cluster.api).await);
    cluster.agent.wait_for_log("node taint removed")?;
    Ok(())
}
