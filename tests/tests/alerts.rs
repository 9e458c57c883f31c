//! The chart's alerts (`prometheusRule.enabled`), checked by the real promtool (Debian's prometheus
//! package, installed by `cargo xtask test`): the rules as the chart renders them pass `promtool check
//! rules`, and tests/alerts/interceptor.test.yaml's cases pass `promtool test rules`: each alert fires
//! on the series of its fault and stays quiet for a healthy agent. Every alert has its runbook section
//! in docs/alerts.md.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context, Result};
use interceptor_tests::{
    chart::{by_kind_and_name, parse_yaml, repo, run, template},
    python::has_kubectl,
};
use serde_json::Value;

const PROMTOOL: &str = "promtool";

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
    let objects = by_kind_and_name(template(&["--set", "prometheusRule.enabled=true"])?);
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
