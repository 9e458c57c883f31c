//! Pod churn (issue "Chaos and scale"): 1,000 Pod create, update and delete events through the fake
//! API server in 10 s, in two rounds, while real pods (network namespaces, kubelet-named cgroups) ask
//! for credentials every 40 ms as an SDK does. The churned objects have no cgroup behind them; some are
//! on another node, which the agent's field selector must keep out of its store; some claim the real
//! pods' UIDs as a static pod's mirror, which anyone who can create pods may write. Meanwhile the real
//! pods live through what a real API server allows to happen to them: a pod's own object names a new
//! role, a pod is deleted while its container still runs and created again under the same name with a
//! new UID and role, a pod's labels change. From the clients' own records: no pod ever got a role its
//! object did not name at that moment, nor credentials STS says are another's; the unannotated pod got
//! nothing; every pod is served after the churn; nothing reached the node's metadata service. And the
//! agent's memory: its count of known pods returns to the real pods' after each round, and the second
//! round leaves its resident memory where the first left it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use interceptor_tests::{
    agent::ACCOUNT_ID,
    bench::process::Memory,
    deployed::{Sts, eventually, health},
    exposition::Samples,
    kube_api::FakeApiServer,
    kube_node::{KubeNode, NODE_NAME, OTHER_NODE, object_only_pod, pod_object},
    load::{ClientPath, LoadClient, Records, all_served_since, caller_arns, now_us},
    privileged,
    sim::{self, SimNode},
};
use k8s_openapi::api::core::v1::Pod;

const ROLE_KEY: &str = "iam.amazonaws.com/role";
/// The annotation a static pod's mirror names the static pod's cgroup with.
const MIRROR_KEY: &str = "kubernetes.io/config.mirror";
/// The role every claim on a real pod's UID asks for.
const ATTACKER_ROLE: &str = "attacker-chosen";

/// Events a round plays, and the pause between two: 100 a second, 1,000 in 10 s.
const CHURN_EVENTS: usize = 1_000;
const CHURN_PAUSE: Duration = Duration::from_millis(10);
/// Between two credential fetches (two requests) of one pod: at most 50 requests a second, well within
/// the agent's default 100 a second per pod.
const CLIENT_PAUSE: Duration = Duration::from_millis(40);
/// The real pods (their objects), which the agent knows before and after each round.
const REAL_PODS: usize = 5;
/// The namespaces of the real pods, which the churned objects share.
const NAMESPACES: [&str; 3] = ["shop", "billing", "batch"];

/// How much resident memory the second round may add to what the first left. Everything the agent
/// keeps per pod is freed when the pod goes, except the bounded list of deleted UIDs (~250 new entries
/// a round, a few tens of KiB at most), so a second round of the same churn reuses what the first
/// freed: it added 4 to 12 KiB in runs on a 2-core machine at a load average of 8. One slimmed Pod
/// (~700 bytes) kept per event, a leak injected to calibrate this, added 512 KiB a round: the bound
/// sits between, far above the allocator's drift and below the smallest leak worth catching.
const SECOND_ROUND_GROWTH_KIB: u64 = 256;

/// A step of the real pods' own story, at a given event of a round.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A pod object claims the ledger pod's UID as a static pod's mirror: harmless while the ledger
    /// pod's own object exists, and it must stay harmless once that object is deleted.
    LedgerUidClaimed,
    /// The cart pod's own object names a new role: an update the API server allows.
    CartRoleChanged,
    /// The invoice pod's labels change; its role does not.
    InvoiceRelabelled,
    /// The ledger pod's object is deleted; its container runs on, as through its grace period.
    LedgerDeleted,
    /// `billing/ledger` is created again, as a StatefulSet does: a new UID, cgroup and role.
    LedgerRecreated,
}

const FIRST_ROUND_STORY: [(usize, Step); 6] = [
    (150, Step::LedgerUidClaimed),
    (250, Step::CartRoleChanged),
    (400, Step::InvoiceRelabelled),
    (500, Step::LedgerDeleted),
    (520, Step::LedgerRecreated),
    (800, Step::InvoiceRelabelled),
];
const SECOND_ROUND_STORY: [(usize, Step); 2] =
    [(400, Step::InvoiceRelabelled), (800, Step::InvoiceRelabelled)];

/// One event of a round.
enum ChurnEvent {
    /// A churned object is created or updated.
    Apply(Box<Pod>),
    /// A churned object is deleted: its namespace and name.
    Delete(String, String),
    /// A step of the real pods' story.
    Story(Step),
}

/// A real pod: its cgroups and network, its object's namespace and name, the roles its object named
/// over time, and its client.
struct Tenant {
    pod: sim::Pod,
    namespace: &'static str,
    name: &'static str,
    /// From when (µs since the epoch) the object named which role, in order; `None`: no role (the
    /// object names none, or is deleted).
    roles: Vec<(u128, Option<String>)>,
    /// The value of the object's `revision` label, which relabelling bumps.
    labels_revision: usize,
    client: LoadClient,
}

impl Tenant {
    /// Applies the pod's object, naming `role`, and starts its client in a new container.
    fn start(
        api: &FakeApiServer,
        pod: sim::Pod,
        (namespace, name): (&'static str, &'static str),
        role: Option<&str>,
        path: ClientPath,
    ) -> Result<Self> {
        let roles = vec![(now_us(), role.map(str::to_owned))];
        api.apply_pod(tenant_object(&pod, (namespace, name), role, 0));
        Ok(Self {
            client: LoadClient::start_paced(&pod, &pod.container()?, path, CLIENT_PAUSE)?,
            pod,
            namespace,
            name,
            roles,
            labels_revision: 0,
        })
    }

    /// Applies the pod's object naming `role`, noting from when it does (before the agent can know).
    fn name_role(&mut self, api: &FakeApiServer, role: Option<&str>) {
        self.roles.push((now_us(), role.map(str::to_owned)));
        api.apply_pod(self.object());
    }

    /// The pod's object as it is now: its current role and labels.
    fn object(&self) -> Pod {
        let role = self.roles.last().and_then(|(_, role)| role.as_deref());
        tenant_object(&self.pod, (self.namespace, self.name), role, self.labels_revision)
    }

    /// Stops the client: what it recorded, against what the object named.
    async fn finish(self, label: &str) -> Result<(Outcome, sim::Pod)> {
        let outcome = Outcome {
            label: format!(
                "{}/{} ({label}, {})",
                self.namespace,
                self.name,
                self.client.path().describe()
            ),
            session_name: format!("{}.{}", self.namespace, self.name),
            roles: self.roles,
            records: self.client.finish().await?,
        };
        Ok((outcome, self.pod))
    }
}

/// A real pod's object: naming `role`, if any, with a `revision` label.
fn tenant_object(
    pod: &sim::Pod,
    (namespace, name): (&str, &str),
    role: Option<&str>,
    labels_revision: usize,
) -> Pod {
    let annotations: Vec<(&str, &str)> = role.map(|role| (ROLE_KEY, role)).into_iter().collect();
    let mut object = pod_object(pod, namespace, name, &annotations);
    let labels = object.metadata.labels.get_or_insert_default();
    labels.insert("revision".to_owned(), labels_revision.to_string());
    object
}

/// The real pods.
struct Tenants {
    /// `shop/web`, `app-web` all along.
    web: Tenant,
    /// `shop/cart`, `app-cart`, then `app-cart-v2`.
    cart: Tenant,
    /// `billing/invoice`, `app-invoice` all along, relabelled.
    invoice: Tenant,
    /// `billing/ledger`, `app-ledger`; after its re-creation, the new pod with `app-ledger-v2`.
    ledger: Tenant,
    /// `batch/plain`, no role.
    plain: Tenant,
    /// Pods whose object was deleted while their container runs on.
    terminating: Vec<Tenant>,
}

impl Tenants {
    fn start(cluster: &mut KubeNode) -> Result<Self> {
        let mut tenant = |key, role, path| {
            let pod = cluster.node.pod()?;
            Tenant::start(&cluster.api, pod, key, role, path)
        };
        Ok(Self {
            web: tenant(("shop", "web"), Some("app-web"), ClientPath::KEEP_ALIVE)?,
            cart: tenant(("shop", "cart"), Some("app-cart"), ClientPath::NEW_CONNECTIONS)?,
            invoice: tenant(
                ("billing", "invoice"),
                Some("app-invoice"),
                ClientPath::KEEP_ALIVE.with_imds_v2(),
            )?,
            ledger: tenant(
                ("billing", "ledger"),
                Some("app-ledger"),
                ClientPath::NEW_CONNECTIONS.with_imds_v2(),
            )?,
            plain: tenant(("batch", "plain"), None, ClientPath::NEW_CONNECTIONS)?,
            terminating: Vec::new(),
        })
    }

    /// The clients of the pods whose object names a role.
    fn annotated_clients(&self) -> [&LoadClient; 4] {
        [&self.web, &self.cart, &self.invoice, &self.ledger].map(|tenant| &tenant.client)
    }

    /// The UIDs of the running pods (the deleted ledger pod's among them while it terminates).
    fn uids(&self) -> Vec<String> {
        [&self.web, &self.cart, &self.invoice, &self.ledger, &self.plain]
            .into_iter()
            .chain(&self.terminating)
            .map(|tenant| tenant.pod.uid.clone())
            .collect()
    }

    /// Takes a step of the story.
    fn take_step(&mut self, step: Step, cluster: &mut KubeNode, churned: &mut Churned) -> Result<()> {
        match step {
            Step::LedgerUidClaimed => {
                let claim = object_only_pod(
                    "billing",
                    "ledger-claim",
                    &[(ROLE_KEY, ATTACKER_ROLE), (MIRROR_KEY, &self.ledger.pod.uid)],
                );
                churned.apply(&cluster.api, claim);
            }
            Step::CartRoleChanged => self.cart.name_role(&cluster.api, Some("app-cart-v2")),
            Step::InvoiceRelabelled => {
                self.invoice.labels_revision += 1;
                cluster.api.apply_pod(self.invoice.object());
            }
            Step::LedgerDeleted => {
                self.ledger.roles.push((now_us(), None));
                ensure!(cluster.api.delete_pod("billing", "ledger"), "no ledger pod");
            }
            Step::LedgerRecreated => {
                let pod = cluster.node.pod()?;
                let path = self.ledger.client.path();
                let new = Tenant::start(
                    &cluster.api,
                    pod,
                    ("billing", "ledger"),
                    Some("app-ledger-v2"),
                    path,
                )?;
                self.terminating.push(std::mem::replace(&mut self.ledger, new));
            }
        }
        Ok(())
    }

    /// Stops the clients of the pods that were terminating and removes their cgroups.
    async fn end_terminated(&mut self, outcomes: &mut Vec<Outcome>) -> Result<()> {
        for tenant in self.terminating.drain(..) {
            let (outcome, pod) = tenant.finish("deleted while running").await?;
            outcomes.push(outcome);
            pod.remove()?;
        }
        Ok(())
    }

    /// Stops every client.
    async fn finish(self, outcomes: &mut Vec<Outcome>) -> Result<()> {
        for (tenant, label) in [
            (self.web, "role unchanged"),
            (self.cart, "role changed"),
            (self.invoice, "relabelled"),
            (self.ledger, "re-created"),
            (self.plain, "unannotated"),
        ] {
            outcomes.push(tenant.finish(label).await?.0);
        }
        Ok(())
    }
}

/// The churned objects alive now: by namespace and name, whether they are on this node.
#[derive(Default)]
struct Churned(BTreeMap<(String, String), bool>);

impl Churned {
    fn apply(&mut self, api: &FakeApiServer, object: Pod) {
        let on_this_node = object.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(NODE_NAME);
        let key = (
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        );
        api.apply_pod(object);
        self.0.insert(key, on_this_node);
    }

    fn delete(&mut self, api: &FakeApiServer, namespace: String, name: String) -> Result<()> {
        ensure!(api.delete_pod(&namespace, &name), "no pod {namespace}/{name}");
        self.0.remove(&(namespace, name));
        Ok(())
    }

    /// How many are on this node: the agent's store must hold these and no other.
    fn on_this_node(&self) -> usize {
        self.0.values().filter(|on_this_node| **on_this_node).count()
    }

    fn delete_all(&mut self, api: &FakeApiServer) -> Result<()> {
        for (namespace, name) in std::mem::take(&mut self.0).into_keys() {
            ensure!(api.delete_pod(&namespace, &name), "no pod {namespace}/{name}");
        }
        Ok(())
    }
}

/// Object `k` of round `round` at `revision`: 0 as created, 1 naming another role (or, for a claim on
/// a real pod's UID, claiming another pod's), 2 with new labels too. Every fourth is on another node;
/// every fifth claims one of `claimed_uids`.
fn churned_object(round: usize, k: usize, revision: usize, claimed_uids: &[String]) -> Pod {
    let (namespace, name) = churned_key(round, k);
    let role = format!("churn-{k}-v{}", revision.min(1));
    let annotations: Vec<(&str, &str)> = if k.is_multiple_of(5) {
        let claimed = &claimed_uids[(k / 5 + revision.min(1)) % claimed_uids.len()];
        vec![(ROLE_KEY, ATTACKER_ROLE), (MIRROR_KEY, claimed)]
    } else {
        vec![(ROLE_KEY, &role)]
    };
    let mut object = object_only_pod(namespace, &name, &annotations);
    if k % 4 == 3 {
        object.spec.get_or_insert_default().node_name = Some(OTHER_NODE.to_owned());
    }
    if revision == 2 {
        let labels = object.metadata.labels.get_or_insert_default();
        labels.insert("pod-template-hash".to_owned(), format!("{k}-v2"));
    }
    object
}

/// The namespace and name of object `k` of round `round`.
fn churned_key(round: usize, k: usize) -> (&'static str, String) {
    (NAMESPACES[k % NAMESPACES.len()], format!("churn-{round}-{k}"))
}

/// The object churn of a round, four events a tick: object `t` created, object `t - 10` naming another
/// role, object `t - 20` relabelled, object `t - 30` deleted; about 30 objects live at once.
fn object_churn(round: usize, claimed_uids: Vec<String>) -> impl Iterator<Item = ChurnEvent> {
    (0..).flat_map(move |tick: usize| {
        let revised = |age: usize, revision: usize| {
            let k = tick.checked_sub(age)?;
            let object = churned_object(round, k, revision, &claimed_uids);
            Some(ChurnEvent::Apply(Box::new(object)))
        };
        let deleted = tick.checked_sub(30).map(|k| {
            let (namespace, name) = churned_key(round, k);
            ChurnEvent::Delete(namespace.to_owned(), name)
        });
        [revised(0, 0), revised(10, 1), revised(20, 2), deleted]
            .into_iter()
            .flatten()
    })
}

/// A round's [`CHURN_EVENTS`] events: the object churn, with the story's steps at their places.
fn round_plan(round: usize, claimed_uids: Vec<String>, story: &[(usize, Step)]) -> Vec<ChurnEvent> {
    let mut plan: Vec<ChurnEvent> = object_churn(round, claimed_uids)
        .take(CHURN_EVENTS - story.len())
        .collect();
    for &(at, step) in story {
        plan.insert(at, ChurnEvent::Story(step));
    }
    plan
}

/// The agent's count of known pods (`interceptor_kubernetes_pods`).
async fn known_pods(cluster: &KubeNode) -> Result<usize> {
    let (status, exposition) = health(&cluster.node, "/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(Samples::parse(&exposition)?.get("interceptor_kubernetes_pods{}") as usize)
}

/// Waits (bounded) until the agent knows `expected` pods, then reads its resident memory (KiB).
async fn settled_rss(cluster: &KubeNode, expected: usize, when: &str) -> Result<u64> {
    let settled =
        eventually(|| async { known_pods(cluster).await.is_ok_and(|known| known == expected) }).await;
    ensure!(
        settled,
        "{when}: the agent knows {:?} pods, not {expected}",
        known_pods(cluster).await
    );
    Ok(Memory::of(cluster.agent.pid())?.rss_kib)
}

/// What a round showed of the agent's memory.
struct RoundMemory {
    after_churn_kib: u64,
    after_cleanup_kib: u64,
}

/// Plays round `round` at [`CHURN_PAUSE`] per event (on a schedule, so a slow event does not push the
/// rest back), checks that the agent's store holds exactly this node's pods, deletes the churned
/// objects left and checks that the store is back to the real pods.
async fn play_round(
    round: usize,
    story: &[(usize, Step)],
    cluster: &mut KubeNode,
    tenants: &mut Tenants,
) -> Result<RoundMemory> {
    let plan = round_plan(round, tenants.uids(), story);
    let mut churned = Churned::default();
    let started = Instant::now();
    let schedule = tokio::time::Instant::now();
    for (index, event) in (0u32..).zip(plan) {
        tokio::time::sleep_until(schedule + CHURN_PAUSE * index).await;
        match event {
            ChurnEvent::Apply(object) => churned.apply(&cluster.api, *object),
            ChurnEvent::Delete(namespace, name) => churned.delete(&cluster.api, namespace, name)?,
            ChurnEvent::Story(step) => tenants.take_step(step, cluster, &mut churned)?,
        }
    }
    let took = started.elapsed();
    let (this_node, in_all) = (churned.on_this_node(), churned.0.len());
    let after_churn_kib = settled_rss(cluster, REAL_PODS + this_node, "after the churn").await?;
    churned.delete_all(&cluster.api)?;
    let after_cleanup_kib = settled_rss(cluster, REAL_PODS, "with the churned objects deleted").await?;
    println!(
        "round {round}: {CHURN_EVENTS} events in {took:.1?}; left {in_all} churned objects, {this_node} on this \
         node: the agent knew {} pods, then {REAL_PODS} once they were deleted; VmRSS {after_churn_kib} KiB, \
         then {after_cleanup_kib} KiB",
        REAL_PODS + this_node
    );
    Ok(RoundMemory {
        after_churn_kib,
        after_cleanup_kib,
    })
}

/// What a real pod's client recorded, against what its object named.
struct Outcome {
    label: String,
    session_name: String,
    roles: Vec<(u128, Option<String>)>,
    records: Records,
}

impl Outcome {
    /// Every attempt that got a role the object did not name at that moment: each credentials
    /// response must carry a role the object named at or before the attempt ended, and never one
    /// older than a role the client got before (the agent may lag the API server, never go back).
    fn misattributions(&self) -> Vec<String> {
        let mut current = 0;
        let mut wrong = Vec::new();
        for attempt in &self.records.attempts {
            let Some((role, key)) = &attempt.got else { continue };
            let named = self.roles[current..]
                .iter()
                .position(|(from, named)| *from <= attempt.at_us && named.as_ref() == Some(role));
            match named {
                Some(offset) => current += offset,
                None => wrong.push(format!(
                    "{}: got {role} ({key}) at {} µs; its object named {:?}",
                    self.label, attempt.at_us, self.roles
                )),
            }
        }
        wrong
    }

    /// Every credentials response whose AccessKeyId STS says is not this pod's session of the role the
    /// role list gave (another pod's, the node's, or unknown).
    fn foreign_credentials(&self, arns: &BTreeMap<String, String>) -> Vec<String> {
        let mut wrong = BTreeSet::new();
        for (role, key) in self
            .records
            .attempts
            .iter()
            .filter_map(|attempt| attempt.got.as_ref())
        {
            let expected = format!(
                "arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{}",
                self.session_name
            );
            let arn = arns.get(key).map_or("unknown to STS", String::as_str);
            if arn != expected {
                wrong.insert(format!("{}: {key} is {arn}, not {expected}", self.label));
            }
        }
        wrong.into_iter().collect()
    }

    /// Attempts by what they got: a role, or what went wrong.
    fn summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for attempt in &self.records.attempts {
            let what = match (&attempt.got, &attempt.error) {
                (Some((role, _)), _) => role.clone(),
                (None, error) => format!("refused: {}", error.as_deref().unwrap_or("?")),
            };
            *counts.entry(what).or_default() += 1;
        }
        format!(
            "{}: {} attempts, {} distinct AccessKeyIds: {counts:?}",
            self.label,
            self.records.attempts.len(),
            self.records.credentials.len()
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_pod_events_in_ten_seconds_twice_misattribute_nothing_and_leak_nothing() -> Result<()> {
    const TEST: &str = "pod churn";
    if !privileged::can_run(TEST) || !privileged::has_python_tools(TEST) {
        return Ok(());
    }
    let test_started = Instant::now();
    let mut cluster = KubeNode::start(SimNode::new()?, Sts::Moto, &[])?;
    let mut tenants = Tenants::start(&mut cluster)?;
    ensure!(
        all_served_since(&tenants.annotated_clients(), 0).await,
        "not every annotated pod was served before the churn"
    );
    let baseline_kib = settled_rss(&cluster, REAL_PODS, "before the churn").await?;
    println!("before the churn: the agent knows {REAL_PODS} pods; VmRSS {baseline_kib} KiB");

    let mut outcomes = Vec::new();
    let first = play_round(1, &FIRST_ROUND_STORY, &mut cluster, &mut tenants).await?;
    tenants.end_terminated(&mut outcomes).await?;
    let second = play_round(2, &SECOND_ROUND_STORY, &mut cluster, &mut tenants).await?;

    let churn_ended_us = now_us();
    ensure!(
        all_served_since(&tenants.annotated_clients(), churn_ended_us).await,
        "not every annotated pod was served again after the churn"
    );
    tenants.finish(&mut outcomes).await?;
    let credentials = outcomes
        .iter()
        .flat_map(|outcome| outcome.records.credentials.clone())
        .collect();
    let arns = caller_arns(&cluster.node, &cluster.moto().url(), &credentials).await?;
    for outcome in &outcomes {
        println!("{}", outcome.summary());
    }
    let wrong: Vec<String> = outcomes
        .iter()
        .flat_map(|outcome| [outcome.misattributions(), outcome.foreign_credentials(&arns)].concat())
        .collect();
    assert!(wrong.is_empty(), "misattributed:\n{}", wrong.join("\n"));
    let plain = outcomes
        .iter()
        .find(|outcome| outcome.session_name == "batch.plain")
        .context("the unannotated pod's outcome")?;
    assert_eq!(plain.records.served(), 0, "the unannotated pod was served");
    let last = plain
        .records
        .attempts
        .last()
        .context("the unannotated pod never asked")?;
    assert!(
        last.at_us > churn_ended_us && last.error.as_deref() == Some("status 404"),
        "the unannotated pod was not refused for want of a role after the churn"
    );
    assert_eq!(
        cluster.stand_in.tcp_accepted(),
        0,
        "{:?}",
        cluster.stand_in.metadata_paths()
    );

    let growth = second.after_cleanup_kib.saturating_sub(first.after_cleanup_kib);
    println!(
        "VmRSS (KiB): {baseline_kib} before, {} / {} after round 1 (churn / cleanup), {} / {} after round 2; \
         the second round added {growth} KiB; {} distinct AccessKeyIds checked with STS; the test took {:.1?}",
        first.after_churn_kib,
        first.after_cleanup_kib,
        second.after_churn_kib,
        second.after_cleanup_kib,
        arns.len(),
        test_started.elapsed()
    );
    assert!(
        growth <= SECOND_ROUND_GROWTH_KIB,
        "the second round of the same churn grew the agent by {growth} KiB (bound {SECOND_ROUND_GROWTH_KIB})"
    );
    Ok(())
}
