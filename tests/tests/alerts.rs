//! The chart's alerts (`prometheusRule.enabled`), checked by the real promtool and Prometheus
//! (Debian's prometheus package, installed by `cargo xtask test`): the rules as the chart renders them
//! pass `promtool check rules`, and tests/alerts/interceptor.test.yaml's cases pass `promtool test
//! rules`: each alert fires on the series of its fault and stays quiet for a healthy agent. Then a real
//! Prometheus scrapes a real agent on the simulated node through faults (a pod refused, STS down, STS
//! throttling) and raises their alerts, pending and then firing, and no other; then every query of the
//! chart's Grafana dashboard returns data from it. Every alert has its runbook section in
//! docs/alerts.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use interceptor_tests::{
    chart::{by_kind_and_name, parse_yaml, repo, run, template},
    deployed::{METRICS_PORT, ROLE_LIST, Sts, curl, status_of},
    kube_node::{KubeNode, pod_object},
    moto::MOTO_PORT,
    privileged,
    prometheus::{Alert, Prometheus},
    python::has_kubectl,
    sim::{NODE_IP, Pod, SimNode},
    sts_proxy::{StsMode, StsProxy},
};
use serde_json::Value;

const PROMTOOL: &str = "promtool";
const ROLE_KEY: &str = "iam.amazonaws.com/role";

fn can_run(test: &str) -> bool {
    if !has_kubectl(test) {
        return false;
    }
    if Command::new(PROMTOOL).arg("--version").output().is_ok() {
        return true;
    }
    let why = "promtool (Debian's prometheus package): run `cargo xtask test`";
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run under CI: needs {why}");
    }
    eprintln!("skipping {test}: needs {why}");
    false
}

/// The PrometheusRule's `spec` as `helm template --set prometheusRule.enabled=true` renders it for
/// release `interceptor` in kube-system: a rule file's `groups`.
fn rendered_rules() -> Result<Value> {
    rendered_rules_with(&[])
}

/// [`rendered_rules`] with more `--set` values.
fn rendered_rules_with(values: &[&str]) -> Result<Value> {
    let set = std::iter::once("prometheusRule.enabled=true")
        .chain(values.iter().copied())
        .collect::<Vec<_>>()
        .join(",");
    let objects = by_kind_and_name(template(&["--set", &set])?);
    let rule = objects
        .get("PrometheusRule/interceptor")
        .context("no PrometheusRule rendered")?;
    Ok(rule["spec"].clone())
}

fn alert_names(rules: &Value) -> BTreeSet<String> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

/// Writes the rendered rules as `rules.yaml` (JSON, which YAML takes) beside a copy of the unit tests.
fn write_rules(dir: &Path, rules: &Value) -> Result<std::path::PathBuf> {
    std::fs::write(dir.join("rules.yaml"), serde_json::to_string_pretty(rules)?)?;
    let tests = dir.join("interceptor.test.yaml");
    std::fs::copy(repo().join("tests/alerts/interceptor.test.yaml"), &tests)?;
    Ok(tests)
}

#[test]
fn the_charts_alerts_pass_promtools_checks_and_unit_tests() -> Result<()> {
    if !can_run("alerts under promtool") {
        return Ok(());
    }
    let rules = rendered_rules()?;
    let dir = tempfile::tempdir()?;
    let tests = write_rules(dir.path(), &rules)?;
    let checked = run(Command::new(PROMTOOL)
        .args(["check", "rules"])
        .arg(dir.path().join("rules.yaml")))?;
    let alerts = alert_names(&rules);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = run(Command::new(PROMTOOL).args(["test", "rules"]).arg(&tests))?;
    assert!(tested.contains("SUCCESS"), "{tested}");
    println!("{checked}{tested}");
    Ok(())
}

#[test]
fn every_alert_has_a_firing_case_a_quiet_case_and_a_runbook() -> Result<()> {
    if !can_run("alerts' cases and runbooks") {
        return Ok(());
    }
    let alerts = alert_names(&rendered_rules()?);
    assert_eq!(alerts.len(), 14, "{alerts:?}");
    let cases = std::fs::read_to_string(repo().join("tests/alerts/interceptor.test.yaml"))?;
    let parsed = parse_yaml(&cases)?;
    // (alert, whether the case expects it to fire) for every case of every test.
    let expectations: Vec<(String, bool)> = parsed[0]["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|test| test["alert_rule_test"].as_array().into_iter().flatten())
        .map(|case| {
            let fires = case["exp_alerts"]
                .as_array()
                .is_some_and(|alerts| !alerts.is_empty());
            (case["alertname"].as_str().unwrap_or_default().to_owned(), fires)
        })
        .collect();
    let runbook = std::fs::read_to_string(repo().join("docs/alerts.md"))?;
    for alert in &alerts {
        let firing = expectations
            .iter()
            .filter(|(name, fires)| name == alert && *fires)
            .count();
        let quiet = expectations
            .iter()
            .filter(|(name, fires)| name == alert && !*fires)
            .count();
        assert!(
            firing >= 1 && quiet >= 1,
            "{alert}: {firing} firing, {quiet} quiet cases"
        );
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "docs/alerts.md has no section for {alert}"
        );
        let anchor = format!("runbook: docs/alerts.md#{}", alert.to_lowercase());
        assert!(
            cases.contains(&anchor),
            "{alert}: its runbook annotation is not checked"
        );
    }
    Ok(())
}

/// The dashboard as the chart's ConfigMap (`grafanaDashboard.enabled`) carries it.
fn dashboard() -> Result<Value> {
    let objects = by_kind_and_name(template(&["--set", "grafanaDashboard.enabled=true"])?);
    let config_map = objects
        .get("ConfigMap/interceptor-dashboard")
        .context("no dashboard ConfigMap rendered")?;
    anyhow::ensure!(
        config_map["metadata"]["labels"]["grafana_dashboard"] == "1",
        "the Grafana sidecar's label: {config_map}"
    );
    let json = config_map["data"]["interceptor.json"]
        .as_str()
        .context("the ConfigMap holds no interceptor.json")?;
    serde_json::from_str(json).context("the dashboard is not JSON")
}

/// Every panel's title with each of its queries.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |target| Some((title.clone(), target["expr"].as_str()?.to_owned())))
        })
        .collect()
}

#[test]
fn the_dashboard_covers_what_an_operator_watches_and_each_query_parses() -> Result<()> {
    if !can_run("the dashboard") {
        return Ok(());
    }
    let dashboard = dashboard()?;
    let queries = panel_queries(&dashboard);
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    assert_eq!(panels, 13, "{dashboard}");
    for metric in [
        "interceptor_metadata_requests_total",
        "interceptor_metadata_request_duration_seconds_bucket",
        "interceptor_metadata_refusals_total",
        "interceptor_sts_assume_role_total",
        "interceptor_sts_assume_role_duration_seconds_bucket",
        "interceptor_credential_cache_lookups_total",
        "interceptor_kubernetes_pods",
        "interceptor_pod_waits_total",
        "interceptor_bpf_connections_total",
        "interceptor_bpf_packets_dropped_total",
        "interceptor_process_resident_memory_bytes",
    ] {
        assert!(
            queries.iter().any(|(_, expr)| expr.contains(metric)),
            "no panel shows {metric}"
        );
    }
    // promtool parses each query as Prometheus would (a rule file of recording rules).
    let rules = serde_json::json!({"groups": [{"name": "dashboard", "rules": queries
        .iter()
        .enumerate()
        .map(|(index, (_, expr))| serde_json::json!({"record": format!("dashboard:query{index}"), "expr": expr}))
        .collect::<Vec<_>>()}]});
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("dashboard.yaml"), serde_json::to_string(&rules)?)?;
    let checked = run(Command::new(PROMTOOL)
        .args(["check", "rules"])
        .arg(dir.path().join("dashboard.yaml")))?;
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
    Ok(())
}

/// The agent pod's name as the chart's rules match it (`<fullname>-<5 characters>`).
const AGENT_POD: &str = "interceptor-abcde";

/// A pod's container that asks the metadata service `url` on every round.
struct Asking<'a> {
    pod: &'a Pod,
    container: std::path::PathBuf,
    url: String,
}

/// What the alerts did while the pods kept asking: each alert (its labels) with the states it was seen
/// in, in order, without repeats.
#[derive(Debug, Default)]
struct Seen(Vec<(BTreeMap<String, String>, Vec<String>)>);

impl Seen {
    fn record(&mut self, alert: Alert) {
        let at = match self.0.iter().position(|(labels, _)| *labels == alert.labels) {
            Some(at) => at,
            None => {
                self.0.push((alert.labels, Vec::new()));
                self.0.len() - 1
            }
        };
        let states = &mut self.0[at].1;
        if states.last() != Some(&alert.state) {
            states.push(alert.state);
        }
    }

    /// The states of `alert` whose label `key` is `value`.
    fn states(&self, alert: &str, key: &str, value: &str) -> &[String] {
        self.0
            .iter()
            .find(|(labels, _)| {
                labels.get("alertname").map(String::as_str) == Some(alert)
                    && labels.get(key).map(String::as_str) == Some(value)
            })
            .map_or(&[], |(_, states)| states.as_slice())
    }

    fn names(&self) -> BTreeSet<&str> {
        self.0
            .iter()
            .filter_map(|(labels, _)| labels.get("alertname").map(String::as_str))
            .collect()
    }
}

/// Lets the pods in `asking` ask once a round (every 250 ms or so) and records Prometheus's alerts
/// each round into `seen`, until `alert` whose `key` label is `value` fires; fails after 90 s.
async fn ask_until_firing(
    node: &SimNode,
    prometheus: &Prometheus,
    asking: &[Asking<'_>],
    seen: &mut Seen,
    (alert, key, value): (&str, &str, &str),
) -> Result<()> {
    let started = Instant::now();
    loop {
        for pod in asking {
            curl(pod.pod, &pod.container, &[&pod.url]).await?;
        }
        for now in prometheus.alerts(node).await? {
            seen.record(now);
        }
        if seen.states(alert, key, value).last().map(String::as_str) == Some("firing") {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "{alert}{{{key}={value:?}}} did not fire within 90 s; seen: {seen:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_raises_each_faults_alerts_and_answers_every_dashboard_query() -> Result<()> {
    let test = "alerts from a real Prometheus";
    if !can_run(test) || !privileged::can_run(test) || !privileged::has_python_tools(test) {
        return Ok(());
    }
    // Short `for`s so that pending turns to firing within the test; the expressions are the chart's.
    let rules = rendered_rules_with(&[
        "prometheusRule.for.sts=3s",
        "prometheusRule.for.refusals=3s",
        "prometheusRule.for.agentUnavailable=3s",
    ])?;
    let mut node = SimNode::new()?;
    let (served, refused, late, newcomer) = (node.pod()?, node.pod()?, node.pod()?, node.pod()?);
    let proxy = StsProxy::start(&node, SocketAddr::from((NODE_IP, MOTO_PORT)))?;
    let sts_url = proxy.url();
    // The last `--sts-endpoint` wins: STS through the proxy. `--sts-timeout` leaves the SDK room for its
    // retries, so a throttled call ends as throttled.
    let t = KubeNode::start(
        node,
        Sts::Moto,
        &["--sts-endpoint", &sts_url, "--sts-timeout", "30s"],
    )?;
    for (pod, name, role) in [
        (&served, "served", "app"),
        (&refused, "refused", "not a role!"),
        (&late, "late", "late"),
    ] {
        t.api
            .apply_pod(pod_object(pod, "shop", name, &[(ROLE_KEY, role)]));
    }
    let prometheus = Prometheus::start(
        &t.node,
        &rules,
        SocketAddr::from((NODE_IP, METRICS_PORT)),
        &[("namespace", "kube-system"), ("pod", AGENT_POD)],
    )?;
    let asking = |pod, url: String| -> Result<Asking<'_>> {
        Ok(Asking {
            pod,
            container: pod.container()?,
            url,
        })
    };
    let mut seen = Seen::default();

    // A pod whose workload names no valid role is refused on every request.
    let healthy_and_refused = [
        asking(&served, format!("{ROLE_LIST}app"))?,
        asking(&refused, ROLE_LIST.to_owned())?,
    ];
    ask_until_firing(
        &t.node,
        &prometheus,
        &healthy_and_refused,
        &mut seen,
        ("InterceptorRefusals", "reason", "invalid_role"),
    )
    .await?;
    assert_eq!(
        seen.states("InterceptorRefusals", "reason", "invalid_role"),
        ["pending", "firing"]
    );
    assert_eq!(seen.names(), BTreeSet::from(["InterceptorRefusals"]), "{seen:?}");
    assert!(prometheus.scrapes(&t.node).await? >= 3);

    // STS goes down: the served pod keeps its cached set, the late pod's session has none.
    proxy.set_mode(StsMode::Down);
    let with_late = [
        asking(&served, format!("{ROLE_LIST}app"))?,
        asking(&late, format!("{ROLE_LIST}late"))?,
    ];
    let late_role = "arn:aws:iam::123456789012:role/late";
    ask_until_firing(
        &t.node,
        &prometheus,
        &with_late,
        &mut seen,
        ("InterceptorStsErrors", "role", late_role),
    )
    .await?;
    assert_eq!(
        seen.states("InterceptorStsErrors", "role", late_role),
        ["pending", "firing"]
    );

    // Then STS throttles the node's calls.
    proxy.set_mode(StsMode::Throttle);
    ask_until_firing(
        &t.node,
        &prometheus,
        &with_late,
        &mut seen,
        ("InterceptorStsThrottled", "pod", AGENT_POD),
    )
    .await?;
    assert_eq!(
        seen.states("InterceptorStsThrottled", "pod", AGENT_POD),
        ["pending", "firing"]
    );
    assert_eq!(
        seen.names(),
        BTreeSet::from([
            "InterceptorRefusals",
            "InterceptorStsErrors",
            "InterceptorStsThrottled"
        ]),
        "only the faults' alerts: {seen:?}"
    );
    println!("alerts seen, each in the states it went through: {seen:?}");

    // A pod whose object the agent has not seen yet waits for it (the dashboard's pod-wait panel).
    let waited = curl(&newcomer, &newcomer.container()?, &[ROLE_LIST]).await?;
    assert_eq!(status_of(&waited), 503, "{waited}");
    every_dashboard_query_returns_data(&t.node, &prometheus).await
}

/// Every query of every panel of the chart's dashboard, as Prometheus answers it now: each must return
/// data. Waits for two more scrapes first, so that the last requests' counters have a rate.
async fn every_dashboard_query_returns_data(node: &SimNode, prometheus: &Prometheus) -> Result<()> {
    let scraped = prometheus.scrapes(node).await?;
    let started = Instant::now();
    while prometheus.scrapes(node).await? < scraped + 2 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "Prometheus stopped scraping"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dashboard = dashboard()?;
    let mut empty = Vec::new();
    let mut queries = 0;
    for (title, expr) in panel_queries(&dashboard) {
        queries += 1;
        let result = prometheus.query(node, &expr).await?;
        if result.is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");
    println!("{queries} dashboard queries, each returned data");
    Ok(())
}
