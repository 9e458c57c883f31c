//! Memory under hostile objects: the real agent with `--serviceaccount-roles` and
//! `--namespace-restrictions` on the simulated node, against a cluster whose 500 ServiceAccounts, 110
//! pods of this node and their namespaces all carry annotations at the API server's limit (256 KiB
//! per object): on some the role, external id, session name or allowed-roles annotation is that
//! large itself, on the others a large unrelated annotation sits beside valid ones. The agent's
//! resident memory stays within the chart's memory request after it has listed them all, after more
//! arrive through its watches, and after its pods have asked, and its peak within the chart's limit.
//! The pods with valid annotations get their credentials from moto, and each oversized annotation
//! gets a refusal and an Event whose messages are cut, never the annotation.

use std::path::PathBuf;

use anyhow::{Context, Result};
use interceptor_tests::{
    bench::process::Memory,
    deployed::{ROLE_LIST, Sts, body_of, curl, eventually, health, status_of},
    exposition::sample_value,
    kube_api::{FakeApiServer, TOTAL_ANNOTATION_SIZE_LIMIT},
    kube_node::{KubeNode, namespace_object, object_only_pod, pod_object, service_account_object},
    privileged,
    sim::{Pod, SimNode},
};
use serde_json::Value;

const ROLE_KEY: &str = "iam.amazonaws.com/role";
const EXTERNAL_ID_KEY: &str = "iam.amazonaws.com/external-id";
const SESSION_NAME_KEY: &str = "iam.amazonaws.com/session-name";
const ALLOWED_ROLES_KEY: &str = "iam.amazonaws.com/allowed-roles";
/// An annotation the agent never reads, as large as the limit leaves room for.
const UNRELATED_KEY: &str = "example.com/last-applied-configuration";

const SERVICE_ACCOUNTS: usize = 500;
const PODS: usize = 110;
const NAMESPACES: usize = 20;
/// The chart's memory request (deploy/helm/interceptor/values.yaml).
const MEMORY_REQUEST_KIB: u64 = 48 * 1024;
/// The chart's memory limit, where the kernel kills the agent.
const MEMORY_LIMIT_KIB: u64 = 128 * 1024;
/// A release build's code and mapped files, resident (`RssFile`): 18.7 to 20.7 MiB when this test ran
/// with `INTERCEPTOR_AGENT_BIN=target/release/interceptor`, rounded up.
const RELEASE_CODE_RESIDENT_KIB: u64 = 21 * 1024;

/// Annotations totalling the API server's limit: `fixed` as given, and `grown`'s value as long as the
/// rest of the limit allows.
fn at_limit(fixed: &[(&str, &str)], grown: &str) -> Vec<(String, String)> {
    let used: usize = fixed.iter().map(|(key, value)| key.len() + value.len()).sum();
    let room = TOTAL_ANNOTATION_SIZE_LIMIT - used - grown.len();
    fixed
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .chain([(grown.to_owned(), "z".repeat(room))])
        .collect()
}

fn pairs(annotations: &[(String, String)]) -> Vec<(&str, &str)> {
    annotations
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect()
}

/// The annotations of a pod or ServiceAccount of kind `n`: in turn a role, an external id or a session
/// name at the whole limit, or a valid role beside an unrelated annotation at the limit.
fn hostile_request(n: usize) -> Vec<(String, String)> {
    match n % 4 {
        0 => at_limit(&[], ROLE_KEY),
        1 => at_limit(&[(ROLE_KEY, "app-x")], EXTERNAL_ID_KEY),
        2 => at_limit(&[(ROLE_KEY, "app-x")], SESSION_NAME_KEY),
        _ => at_limit(&[(ROLE_KEY, "app-x")], UNRELATED_KEY),
    }
}

fn namespace_name(n: usize) -> String {
    format!("ns-{:02}", n % NAMESPACES)
}

/// The last namespace's allowed-roles annotation is the limit's whole size; the others allow `app-*`
/// beside an unrelated annotation at the limit.
fn namespace_annotations(n: usize) -> Vec<(String, String)> {
    if n == NAMESPACES - 1 {
        at_limit(&[], ALLOWED_ROLES_KEY)
    } else {
        at_limit(&[(ALLOWED_ROLES_KEY, r#"["app-*"]"#)], UNRELATED_KEY)
    }
}

/// A pod of the node that asks for credentials, what its objects say, and what it must get.
struct Asking {
    pod: Pod,
    container: PathBuf,
    name: &'static str,
    namespace: String,
    annotations: Vec<(String, String)>,
    /// Its ServiceAccount's annotations, when it takes its role from one.
    account: Option<Vec<(String, String)>>,
    /// 200 and this role, or 403 with this refusal reason and Event reason.
    expected: Result<&'static str, (&'static str, &'static str)>,
}

impl Asking {
    fn new(
        node: &mut SimNode,
        name: &'static str,
        namespace: usize,
        annotations: Vec<(String, String)>,
        expected: Result<&'static str, (&'static str, &'static str)>,
    ) -> Result<Self> {
        let pod = node.pod()?;
        let container = pod.container()?;
        Ok(Self {
            pod,
            container,
            name,
            namespace: namespace_name(namespace),
            annotations,
            account: None,
            expected,
        })
    }

    fn with_account(mut self, annotations: Vec<(String, String)>) -> Self {
        self.account = Some(annotations);
        self
    }

    fn apply(&self, api: &FakeApiServer) {
        let mut object = pod_object(&self.pod, &self.namespace, self.name, &pairs(&self.annotations));
        if let Some(account) = &self.account {
            api.apply_service_account(service_account_object(
                &self.namespace,
                self.name,
                &pairs(account),
            ));
            object
                .spec
                .as_mut()
                .expect("pods have a spec")
                .service_account_name = Some(self.name.to_owned());
        }
        api.apply_pod(object);
    }
}

/// The cluster's hostile objects: the namespaces, `SERVICE_ACCOUNTS` ServiceAccounts (`round` tells
/// apart the versions of a second pass) and the node's pods besides `asking`.
fn apply_hostile_objects(api: &FakeApiServer, asking: &[Asking], round: usize) {
    for n in 0..NAMESPACES {
        api.apply_namespace(namespace_object(
            &namespace_name(n),
            &pairs(&namespace_annotations(n)),
        ));
    }
    let accounts = SERVICE_ACCOUNTS - asking.iter().filter(|pod| pod.account.is_some()).count();
    for n in 0..accounts {
        api.apply_service_account(service_account_object(
            &namespace_name(n),
            &format!("account-{n}"),
            &pairs(&hostile_request(n + round)),
        ));
    }
    for n in 0..PODS - asking.len() {
        api.apply_pod(object_only_pod(
            &namespace_name(n),
            &format!("hostile-{n}"),
            &pairs(&hostile_request(n + round)),
        ));
    }
    for pod in asking {
        pod.apply(api);
    }
}

/// The agent's memory at one moment, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug)]
struct Resident {
    memory: Memory,
    /// `RssAnon`: what the agent allocated (heap, stacks, list pages), in KiB.
    anon_kib: u64,
    /// `RssFile`: the binary's code and other mapped files, in KiB.
    file_kib: u64,
}

impl Resident {
    fn of(cluster: &KubeNode, when: &str) -> Result<Self> {
        let pid = cluster.agent.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        let resident = Self {
            memory: Memory::of(pid)?,
            anon_kib: field("RssAnon")?,
            file_kib: field("RssFile")?,
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "agent memory {when}: VmRSS {:.1} MiB (RssAnon {:.1}, RssFile {:.1}), VmHWM {:.1} MiB",
            mib(resident.memory.rss_kib),
            mib(resident.anon_kib),
            mib(resident.file_kib),
            mib(resident.memory.peak_kib)
        );
        Ok(resident)
    }

    /// Resident memory as the chart's agent, a release build, would have it: what the agent allocated,
    /// and a release build's code. A debug build's code alone is some 38 MiB resident.
    fn as_released_kib(&self) -> u64 {
        self.anon_kib + RELEASE_CODE_RESIDENT_KIB
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_annotations_at_the_api_servers_limit_leave_the_agent_within_its_memory_request() -> Result<()>
{
    if !privileged::can_run("memory under hostile objects")
        || !privileged::has_python_tools("memory under hostile objects")
    {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let valid = |role: &str| at_limit(&[(ROLE_KEY, role)], UNRELATED_KEY);
    let asking = vec![
        Asking::new(&mut node, "valid", 0, valid("app-valid"), Ok("app-valid"))?,
        Asking::new(
            &mut node,
            "by-account",
            0,
            at_limit(&[], UNRELATED_KEY),
            Ok("app-account"),
        )?
        .with_account(valid("app-account")),
        Asking::new(
            &mut node,
            "long-role",
            1,
            at_limit(&[], ROLE_KEY),
            Err(("invalid_role", "IAMRoleAnnotationInvalid")),
        )?,
        Asking::new(
            &mut node,
            "long-external-id",
            1,
            hostile_request(1),
            Err(("invalid_external_id", "IAMRoleAnnotationInvalid")),
        )?,
        Asking::new(
            &mut node,
            "long-session-name",
            1,
            hostile_request(2),
            Err(("invalid_session_name", "IAMRoleAnnotationInvalid")),
        )?,
        Asking::new(
            &mut node,
            "account-long-role",
            2,
            at_limit(&[], UNRELATED_KEY),
            Err(("invalid_role", "IAMRoleAnnotationInvalid")),
        )?
        .with_account(at_limit(&[], ROLE_KEY)),
        Asking::new(
            &mut node,
            "restricted",
            NAMESPACES - 1,
            valid("app-restricted"),
            Err(("bad_namespace_restriction", "IAMRoleNotAllowed")),
        )?,
    ];
    let cluster = KubeNode::start_with(
        node,
        Sts::Moto,
        &["--serviceaccount-roles", "--namespace-restrictions"],
        |api| apply_hostile_objects(api, &asking, 0),
    )?;

    // Ready: every object listed, in pages.
    // Its peak so far is its start (parsing the kernel's BTF) or the lists; from here on, the peak of
    // the watches and the requests.
    let after_sync = Resident::of(&cluster, "after listing every object")?;
    Memory::reset_peak(cluster.agent.pid())?;
    let lists = |path: &str| {
        let requests = cluster.api.requests();
        let pages: Vec<_> = requests
            .iter()
            .filter(|request| request.path == path && request.is_list())
            .collect();
        assert!(
            pages.iter().all(|page| page.param("limit") == Some("25")),
            "{path}: {pages:?}"
        );
        pages.len()
    };
    assert!(lists("/api/v1/serviceaccounts") >= SERVICE_ACCOUNTS / 25);
    assert!(lists("/api/v1/pods") >= PODS / 25);
    assert_eq!(lists("/api/v1/namespaces"), 1);

    // Every object changed, through the watches (each to the next kind of hostile annotation), and
    // then one more pod: once the agent has it, it has had the changes of the pods before it.
    apply_hostile_objects(&cluster.api, &asking, 1);
    cluster
        .api
        .apply_pod(object_only_pod(&namespace_name(0), "last", &[]));
    let watched = eventually(|| async {
        health(&cluster.node, "/metrics").await.is_ok_and(|(_, metrics)| {
            sample_value(&metrics, "interceptor_kubernetes_pods") == (PODS + 1) as f64
        })
    })
    .await;
    assert!(watched, "the agent never had the last pod");
    let after_watch = Resident::of(&cluster, "after every object changed once more")?;

    for pod in &asking {
        let response = curl(&pod.pod, &pod.container, &[ROLE_LIST]).await?;
        match pod.expected {
            Ok(role) => {
                assert_eq!(
                    (status_of(&response), body_of(&response).trim()),
                    (200, role),
                    "{response}"
                );
                let credentials = curl(&pod.pod, &pod.container, &[&format!("{ROLE_LIST}{role}")]).await?;
                let document: Value = serde_json::from_str(body_of(&credentials))
                    .with_context(|| format!("{}: {credentials}", pod.name))?;
                assert_eq!(document["Code"], "Success", "{}", pod.name);
            }
            Err((reason, _)) => {
                assert_eq!(status_of(&response), 403, "{}: {response}", pod.name);
                assert!(body_of(&response).len() < 512, "{}: {response}", pod.name);
                let line = cluster.agent.wait_for_line(reason, |line| {
                    line.contains(r#""message":"metadata request""#)
                        && line.contains(&format!(r#""reason":"{reason}""#))
                        && line.contains(&format!(r#""workload":"{}/{}""#, pod.namespace, pod.name))
                })?;
                assert!(line.len() < 2048, "{line}");
            }
        }
    }
    // A role name in the path as long as a request head may carry: 404, and the path cut in the log.
    let long_name = "o".repeat(10_000);
    let valid = &asking[0];
    let response = curl(
        &valid.pod,
        &valid.container,
        &[&format!("{ROLE_LIST}{long_name}")],
    )
    .await?;
    assert_eq!(status_of(&response), 404, "{:.300}", response);
    assert!(body_of(&response).len() < 512, "{:.300}", response);
    let line = cluster
        .agent
        .wait_for_line("other_role", |line| line.contains(r#""reason":"other_role""#))?;
    assert!(
        line.contains("… (10043 characters)") && line.len() < 2048,
        "{line}"
    );
    let after_requests = Resident::of(&cluster, "after the pods asked")?;

    // One Event per refused pod, its note cut.
    for pod in &asking {
        let Err((_, event_reason)) = pod.expected else {
            continue;
        };
        let events = || {
            cluster
                .api
                .events()
                .into_iter()
                .filter(|event| event["regarding"]["name"] == pod.name)
                .collect::<Vec<_>>()
        };
        assert!(eventually(|| async { events().len() == 1 }).await, "{}", pod.name);
        let event = &events()[0];
        assert_eq!(event["reason"], event_reason, "{event}");
        let note = event["note"].as_str().unwrap_or_default();
        assert!(!note.is_empty() && note.len() < 512, "{}: {note}", pod.name);
    }
    let (_, metrics) = health(&cluster.node, "/metrics").await?;
    for reason in ["invalid_role", "invalid_external_id", "invalid_session_name"] {
        let sample = format!(r#"interceptor_metadata_refusals_total{{reason="{reason}"}}"#);
        assert!(sample_value(&metrics, &sample) >= 1.0, "{sample}");
    }
    for line in cluster.agent.logs() {
        assert!(
            line.len() < 4096,
            "a log line of {} bytes: {:.300}",
            line.len(),
            line
        );
    }

    // An agent binary given by INTERCEPTOR_AGENT_BIN is a release build (the demo's and the
    // benchmark's): its own VmRSS counts. `cargo test` runs the debug build.
    let release_binary = std::env::var_os("INTERCEPTOR_AGENT_BIN").is_some();
    for (when, resident) in [
        ("after the lists", after_sync),
        ("after the watches", after_watch),
        ("after the requests", after_requests),
    ] {
        assert!(
            resident.as_released_kib() <= MEMORY_REQUEST_KIB,
            "{when}: {} KiB allocated and {RELEASE_CODE_RESIDENT_KIB} KiB of a release build's code, \
             over the chart's request of {MEMORY_REQUEST_KIB} KiB",
            resident.anon_kib
        );
        assert!(
            resident.memory.peak_kib <= MEMORY_LIMIT_KIB,
            "{when}: a peak of {} KiB, over the chart's limit of {MEMORY_LIMIT_KIB} KiB",
            resident.memory.peak_kib
        );
        assert!(
            !release_binary || resident.memory.rss_kib <= MEMORY_REQUEST_KIB,
            "{when}: {} KiB resident, over the chart's request of {MEMORY_REQUEST_KIB} KiB",
            resident.memory.rss_kib
        );
    }
    Ok(())
}
