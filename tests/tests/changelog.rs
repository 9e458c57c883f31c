//! CHANGELOG.md names every contract: each flag `interceptor agent --help` lists and each top-level
//! value of the chart, so a flag or value added without its entry fails here.

use std::process::Command;

use anyhow::{Context, Result};
use interceptor_tests::{
    agent::Agent,
    chart::{chart_dir, parse_yaml, repo},
    python::has_kubectl,
};

fn changelog() -> Result<String> {
    std::fs::read_to_string(repo().join("CHANGELOG.md")).context("CHANGELOG.md")
}

#[test]
fn every_agent_flag_has_its_entry() -> Result<()> {
    let help = Command::new(Agent::binary()?)
        .args(["agent", "--help"])
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    // The option lines: `  --flag <VALUE>`, `  -o, --flag ...`; the flag is the first `--` word.
    let flags: Vec<&str> = help
        .lines()
        .filter(|line| line.trim_start().starts_with('-'))
        .filter_map(|line| line.split_whitespace().find_map(|word| word.strip_prefix("--")))
        .map(|flag| flag.split(['=', '[', '<']).next().unwrap_or(flag))
        .filter(|flag| !flag.is_empty() && *flag != "help")
        .collect();
    assert!(flags.len() > 30, "{help}");
    let changelog = changelog()?;
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|flag| !changelog.contains(&format!("`--{flag}")))
        .collect();
    assert!(missing.is_empty(), "flags without a CHANGELOG entry: {missing:?}");
    Ok(())
}

#[test]
fn every_chart_value_has_its_entry() -> Result<()> {
    if !has_kubectl("chart values in the changelog") {
        return Ok(());
    }
    let values = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    let values = parse_yaml(&values)?.remove(0);
    let changelog = changelog()?;
    // The first chart's values are its first entry; each later one is named.
    let first_chart = [
        "image",
        "imagePullSecrets",
        "nameOverride",
        "fullnameOverride",
        "aws",
        "host",
        "metricsPort",
        "cgroupRoot",
        "extraArgs",
        "extraEnv",
        "priorityClassName",
        "tolerations",
        "nodeSelector",
        "affinity",
        "updateStrategy",
        "resources",
        "podAnnotations",
        "podLabels",
        "serviceAccount",
        "rbac",
        "serviceMonitor",
        "podMonitor",
    ];
    let missing: Vec<&String> = values
        .as_object()
        .context("values.yaml is a map")?
        .keys()
        .filter(|key| !first_chart.contains(&key.as_str()))
        .filter(|key| !changelog.contains(&format!("`{key}")))
        .collect();
    assert!(
        missing.is_empty(),
        "chart values without a CHANGELOG entry: {missing:?}"
    );
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml"))?;
    let version = chart
        .lines()
        .find_map(|line| line.strip_prefix("version: "))
        .context("Chart.yaml has a version")?;
    assert!(
        changelog.contains(&format!("| {version} |")),
        "chart {version} has no row"
    );
    Ok(())
}
