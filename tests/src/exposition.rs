//! Reads the agent's `/metrics` with the Prometheus project's own parsers (the `prometheus_client`
//! Python package in the project venv): the strict OpenMetrics one and the classic Prometheus text one
//! must both accept the exposition and read the same samples.

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

use crate::python;

const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus_text
text = sys.stdin.read()
def samples(parse):
    found = {}
    for family in parse(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found
strict, classic = samples(openmetrics), samples(prometheus_text)
if strict != classic:
    sys.exit(f"the OpenMetrics and Prometheus text parsers disagree: {sorted(set(strict.items()) ^ set(classic.items()))}")
print(json.dumps(strict))
"#;

/// Samples by `name{label="value",...}` (labels sorted by name), as the parser read them.
#[derive(Debug, Default)]
pub struct Samples(BTreeMap<String, f64>);

impl Samples {
    /// Parses an exposition; fails when either parser refuses it or they disagree.
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

    /// The samples of metric `name` (with any labels), summed by the value of their label `label`.
    pub fn sum_by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut sums = BTreeMap::new();
        for (key, value) in &self.0 {
            let Some(labels) = key.strip_prefix(name).and_then(|rest| rest.strip_prefix('{')) else {
                continue;
            };
            let of_label = label_value(labels, label).unwrap_or_default();
            *sums.entry(of_label.to_owned()).or_insert(0.0) += value;
        }
        sums
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

/// The value of `sample` (a metric's name and labels, as the agent writes them) in an exposition read
/// as text, without a parser; 0 when absent (a counter nobody has touched yet).
pub fn sample_value(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The value of `label` in the labels of a sample's key after its `{` (`a="x",b="y"}`), which
/// [`Samples::parse`] writes without escapes: the values it reads are fixed strings, numbers and ARNs.
fn label_value<'k>(labels: &'k str, label: &str) -> Option<&'k str> {
    labels
        .strip_suffix('}')?
        .split(',')
        .find_map(|pair| pair.strip_prefix(label)?.strip_prefix("=\"")?.strip_suffix('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_label_by_its_whole_name() {
        let labels = r#"route="credentials",status="429"}"#;
        assert_eq!(label_value(labels, "status"), Some("429"));
        assert_eq!(label_value(labels, "route"), Some("credentials"));
        assert_eq!(label_value(labels, "tatus"), None);
        assert_eq!(label_value(r#"xstatus="1"}"#, "status"), None);
    }
}
