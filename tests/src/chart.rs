//! The Helm chart (`deploy/helm/interceptor`) as the tests read it: rendered offline with the venv's
//! `helm template`, parsed through the venv's PyYAML into JSON values, and looked up by kind and name.

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::python::{helm, tool};

/// The workspace's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/interceptor")
}

/// A values file of the chart's `ci/` folder, as a `--values` argument.
pub fn values_file(name: &str) -> String {
    chart_dir().join("ci").join(name).display().to_string()
}

pub fn output(command: &mut Command) -> Result<Output> {
    command.output().with_context(|| format!("running {command:?}"))
}

/// Runs `command`, its standard output when it succeeds.
pub fn run(command: &mut Command) -> Result<String> {
    let out = output(command)?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Multi-document YAML as JSON values (empty documents left out), through the venv's PyYAML.
pub fn parse_yaml(yaml: &str) -> Result<Vec<Value>> {
    let mut child = Command::new(tool("python3")?)
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("python's stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "YAML does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `helm template interceptor <chart> --namespace kube-system` with `args` (values files, --set).
pub fn template_yaml(args: &[&str]) -> Result<String> {
    run(Command::new(helm()?)
        .args(["template", "interceptor"])
        .arg(chart_dir())
        .args(["--namespace", "kube-system"])
        .args(args))
}

/// [`template_yaml`], parsed.
pub fn template(args: &[&str]) -> Result<Vec<Value>> {
    parse_yaml(&template_yaml(args)?)
}

/// The objects by `kind/name`.
pub fn by_kind_and_name(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|object| {
            let key = format!(
                "{}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["name"].as_str().unwrap_or("?")
            );
            (key, object)
        })
        .collect()
}

/// The rendered objects of `args`, by `kind/name`.
pub fn render(args: &[&str]) -> Result<BTreeMap<String, Value>> {
    Ok(by_kind_and_name(template(args)?))
}

pub fn daemonset<'a>(objects: &'a BTreeMap<String, Value>, name: &str) -> &'a Value {
    objects
        .get(&format!("DaemonSet/{name}"))
        .unwrap_or_else(|| panic!("no DaemonSet/{name} in {:?}", objects.keys()))
}

/// An array of strings.
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|item| {
            item.as_str()
                .unwrap_or_else(|| panic!("not a string: {item}"))
                .to_string()
        })
        .collect()
}

/// The container's env as name -> value (or the downward API field it is taken from).
pub fn env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|var| {
            let name = var["name"].as_str().expect("env name").to_string();
            let value = match var["value"].as_str() {
                Some(value) => value.to_string(),
                None => format!(
                    "fieldRef:{}",
                    var["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .expect("a value or a fieldRef")
                ),
            };
            (name, value)
        })
        .collect()
}
