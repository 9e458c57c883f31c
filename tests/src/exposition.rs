//! Reads the agent's `/metrics` with the Prometheus project's own OpenMetrics parser (the
//! `prometheus_client` Python package in the project venv), so a test both checks that the exposition
//! parses and gets its samples.

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

use crate::python;

const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}"] = sample.value
print(json.dumps(samples))
"#;

/// Samples by `name{label="value",...}` (labels sorted by name), as the parser read them.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<String, f64>);

impl Samples {
    /// Parses an OpenMetrics text exposition; fails when the parser refuses it.
    pub fn parse(exposition: &str) -> Result<Self> {
        let mut child = Command::new(python::tool("python3")?)
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run the OpenMetrics parser")?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(exposition.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "the exposition does not parse: {}\n{exposition}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(
            serde_json::from_slice(&out.stdout).context("parser output")?,
        ))
    }

    /// A sample's value; 0 when absent (a counter nobody has touched yet).
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// How much each sample grew from `before` to `self`, for the samples that changed.
    pub fn delta(&self, before: &Samples) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(key, value)| (key.clone(), value - before.get(key)))
            .filter(|(_, change)| *change != 0.0)
            .collect()
    }
}
