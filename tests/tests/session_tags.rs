//! Session tags (`--session-tags`) end to end: the real agent on a simulated node, pods from the fake
//! API server, moto as STS. What the tags are is read at the STS side, from the AssumeRole requests
//! moto received, never from the agent's own account of them.

use std::collections::BTreeMap;

use interceptor_tests::{
    deployed::{
        DeployedNode, ROLE_LIST, Sts, body_of, credentials_served_to, curl, eventually, health,
        role_list_becomes, status_of,
    },
    kube_node::{KubeNode, namespace_object, pod_object},
    privileged,
    sim::{self, SimNode},
};
use k8s_openapi::api::core::v1::Pod;

const ROLE_KEY: &str = "iam.amazonaws.com/role";
const SESSION_NAME_KEY: &str = "iam.amazonaws.com/session-name";

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

/// The Pod object of `pod`, `namespace/name` running as `service_account`, annotated with `annotations`.
fn pod_as(
    pod: &sim::Pod,
    namespace: &str,
    name: &str,
    service_account: &str,
    annotations: &[(&str, &str)],
) -> Pod {
    let mut object = pod_object(pod, namespace, name, annotations);
    object
        .spec
        .as_mut()
        .expect("pod_object has a spec")
        .service_account_name = Some(service_account.to_owned());
    object
}

/// What one AssumeRole request carried: its session name, its tags (key to value) and its
/// transitive tag keys, as STS reads them from the form.
#[derive(Debug, PartialEq, Eq)]
struct Sent {
    session_name: String,
    tags: BTreeMap<String, String>,
    transitive: Vec<String>,
}

impl Sent {
    fn of(fields: &[(String, String)]) -> Self {
        let field = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let mut tags = BTreeMap::new();
        for n in 1.. {
            let Some(key) = field(&format!("Tags.member.{n}.Key")) else {
                break;
            };
            let value = field(&format!("Tags.member.{n}.Value")).unwrap_or_default();
            tags.insert(key, value);
        }
        let transitive = (1..)
            .map_while(|n| field(&format!("TransitiveTagKeys.member.{n}")))
            .collect();
        let stray: Vec<&String> = fields
            .iter()
            .map(|(key, _)| key)
            .filter(|key| key.starts_with("Tags.") || key.starts_with("TransitiveTagKeys."))
            .collect();
        assert_eq!(
            stray.len(),
            2 * tags.len() + Vec::<String>::len(&transitive),
            "tag fields out of sequence: {fields:?}"
        );
        Self {
            session_name: field("RoleSessionName").unwrap_or_default(),
            tags,
            transitive,
        }
    }
}

fn sent(cluster: &KubeNode) -> anyhow::Result<Vec<Sent>> {
    Ok(cluster
        .moto()
        .assume_role_requests()?
        .iter()
        .map(|fields| Sent::of(fields))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_assume_role_carries_exactly_its_tags() -> anyhow::Result<()> {
    if !can_run("session tags sent") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let cart = node.pod()?;
    let cluster = KubeNode::start(
        node,
        Sts::Moto,
        &[
            "--session-tags",
            "--cluster-name",
            "prod-eu",
            "--session-tags-transitive",
        ],
    )?;
    cluster.api.apply_pod(pod_as(
        &cart,
        "shop",
        "cart-7d9f-x2",
        "cart",
        &[(ROLE_KEY, "app-cart")],
    ));
    let (role, _) = credentials_served_to(&cart, &cart.container()?).await?;
    assert_eq!(role, "app-cart");

    let sent = sent(&cluster)?;
    println!("AssumeRole as moto received it: {sent:#?}");
    let expected_tags: BTreeMap<String, String> = [
        ("kubernetes-namespace", "shop"),
        ("kubernetes-service-account", "cart"),
        ("kubernetes-pod-name", "cart-7d9f-x2"),
        ("kubernetes-pod-uid", cart.uid.as_str()),
        ("kubernetes-cluster-name", "prod-eu"),
        ("eks-cluster-name", "prod-eu"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].session_name, "shop.cart-7d9f-x2");
    let mut transitive = sent[0].transitive.clone();
    transitive.sort();
    assert_eq!(transitive, expected_tags.keys().cloned().collect::<Vec<_>>());
    assert_eq!(sent[0].tags, expected_tags);
    Ok(())
}

/// Two pods of one role and one session name (the annotation), in two namespaces: with tags, two
/// sessions and two sets of credentials; without, one of each (the cache key is role, external id,
/// session name and tags), and no tag is sent.
#[tokio::test(flavor = "multi_thread")]
async fn pods_sharing_a_session_name_share_credentials_only_without_tags() -> anyhow::Result<()> {
    if !can_run("session tags in the cache key") {
        return Ok(());
    }
    for tagged in [true, false] {
        let mut node = SimNode::new()?;
        let (shop, blog) = (node.pod()?, node.pod()?);
        let flags: &[&str] = if tagged { &["--session-tags"] } else { &[] };
        let cluster = KubeNode::start(node, Sts::Moto, flags)?;
        let annotations = [(ROLE_KEY, "app-web"), (SESSION_NAME_KEY, "web")];
        cluster
            .api
            .apply_pod(pod_as(&shop, "shop", "web", "web", &annotations));
        cluster
            .api
            .apply_pod(pod_as(&blog, "blog", "web", "web", &annotations));
        let (_, shop_creds) = credentials_served_to(&shop, &shop.container()?).await?;
        let (_, blog_creds) = credentials_served_to(&blog, &blog.container()?).await?;

        let sent = sent(&cluster)?;
        assert!(
            sent.iter().all(|request| request.session_name == "web"),
            "{sent:?}"
        );
        if tagged {
            assert_ne!(shop_creds["AccessKeyId"], blog_creds["AccessKeyId"]);
            let namespaces: Vec<&str> = sent
                .iter()
                .map(|request| request.tags["kubernetes-namespace"].as_str())
                .collect();
            assert_eq!(sent.len(), 2, "{sent:?}");
            assert!(
                namespaces.contains(&"shop") && namespaces.contains(&"blog"),
                "{namespaces:?}"
            );
            assert!(
                sent.iter().all(|request| request.transitive.is_empty()),
                "{sent:?}"
            );
        } else {
            assert_eq!(shop_creds["AccessKeyId"], blog_creds["AccessKeyId"]);
            assert_eq!(sent.len(), 1, "{sent:?}");
            assert!(
                sent[0].tags.is_empty() && sent[0].transitive.is_empty(),
                "{sent:?}"
            );
        }
    }
    Ok(())
}

/// A tag value STS would refuse: over 256 characters, or with a character outside its set. The API
/// server refuses such names itself; the agent does not count on that. The pod gets 403 and an
/// Event, never a session without its tags, and STS is not called.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_tags_sts_would_refuse_is_refused_with_an_event() -> anyhow::Result<()> {
    if !can_run("session tags refused") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (long, odd, fine) = (node.pod()?, node.pod()?, node.pod()?);
    let cluster = KubeNode::start(node, Sts::Moto, &["--session-tags"])?;
    // Events go into the pod's namespace, which must exist.
    cluster.api.apply_namespace(namespace_object("shop", &[]));
    // A ServiceAccount name, not a pod name: the Event's own name is the pod's with a suffix, which
    // the API server would refuse over 253 characters.
    let long_account = "s".repeat(257);
    let annotations = [(ROLE_KEY, "app-web")];
    cluster
        .api
        .apply_pod(pod_as(&long, "shop", "long", &long_account, &annotations));
    cluster
        .api
        .apply_pod(pod_as(&odd, "shop", "odd", "web;admin", &annotations));
    cluster
        .api
        .apply_pod(pod_as(&fine, "shop", "fine", "web", &annotations));

    for (pod, name, problem) in [
        (&long, "long", "longer than STS takes"),
        (&odd, "odd", "may only hold letters"),
    ] {
        let container = pod.container()?;
        let refused = curl(pod, &container, &[&format!("{ROLE_LIST}app-web")]).await?;
        assert_eq!(status_of(&refused), 403, "{refused}");
        assert!(
            body_of(&refused).contains("session tags cannot be sent"),
            "{refused}"
        );
        assert!(body_of(&refused).contains(problem), "{refused}");
        let events_for = || {
            cluster
                .api
                .events()
                .into_iter()
                .filter(|event| event["regarding"]["name"] == name)
                .collect::<Vec<_>>()
        };
        assert!(
            eventually(|| async { events_for().len() == 1 }).await,
            "an Event for {name}"
        );
        assert_eq!(events_for()[0]["reason"], "IAMSessionTagsInvalid");
    }
    assert_eq!(
        cluster.moto().assume_role_calls()?,
        0,
        "STS called for a refused pod"
    );
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    for line in [
        r#"interceptor_metadata_refusals_total{reason="bad_session_tags"} 2"#,
        r#"interceptor_kubernetes_refusals_total{reason="bad_session_tags"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(line)), "{line}");
    }

    // The pod beside them, with tags STS takes, is served.
    let (role, _) = credentials_served_to(&fine, &fine.container()?).await?;
    assert_eq!(role, "app-web");
    assert_eq!(cluster.moto().assume_role_calls()?, 1);
    Ok(())
}

/// A static workload file entry's own tags are sent, with no `--session-tags`: writing them is the
/// opt-in.
#[tokio::test(flavor = "multi_thread")]
async fn a_workload_file_entry_sends_its_own_tags() -> anyhow::Result<()> {
    if !can_run("workload file tags") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let batch = node.pod()?;
    let deployed = DeployedNode::start(node, &[], Sts::Moto, &[])?;
    let mount = interceptor::identity::cgroup2_mount()?;
    let cgroup = batch.slice().strip_prefix(&mount)?.display().to_string();
    deployed.workloads.write_raw(&format!(
        "[[workload]]\nname = \"batch\"\ncgroup = \"{cgroup}\"\nrole = \"app-batch\"\n\
         tags = {{ team = \"data eng\", cost-center = \"cc-42\" }}\ntags_transitive = true\n"
    ))?;
    let container = batch.container()?;
    assert!(role_list_becomes(&batch, &container, (200, "app-batch")).await);
    credentials_served_to(&batch, &container).await?;

    let requests = deployed.moto().assume_role_requests()?;
    let sent: Vec<Sent> = requests.iter().map(|fields| Sent::of(fields)).collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let tags: Vec<(&str, &str)> = sent[0]
        .tags
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    assert_eq!(tags, [("cost-center", "cc-42"), ("team", "data eng")]);
    let mut transitive = sent[0].transitive.clone();
    transitive.sort();
    assert_eq!(transitive, ["cost-center", "team"]);
    Ok(())
}
