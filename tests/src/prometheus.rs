//! Debian's Prometheus inside the simulated node: it scrapes the agent's health server every second,
//! with the target labels a PodMonitor gives (`namespace`, `pod`), evaluates the chart's rendered rules
//! every second, and answers its HTTP API on the node's address. Tests ask it what a cluster's
//! Prometheus would say: which alerts are pending or firing, and what a query returns.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Child, Stdio},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    lab::run,
    sim::{NODE_IP, SimNode},
};

pub const PROMETHEUS_PORT: u16 = 9090;

/// One alert as `/api/v1/alerts` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
    pub labels: BTreeMap<String, String>,
}

/// Serves until dropped.
pub struct Prometheus {
    child: Child,
    scraper: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `rules` (a rule file's JSON: `{"groups": [...]}`), scraping `target`
    /// with the labels `target_labels`, and waits until it listens.
    pub fn start(
        node: &SimNode,
        rules: &Value,
        target: SocketAddr,
        target_labels: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("rules.yaml"),
            serde_json::to_string_pretty(rules)?,
        )?;
        let labels: serde_json::Map<String, Value> = target_labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), Value::from(*value)))
            .collect();
        // JSON is YAML: Prometheus reads this as its configuration file.
        let config = serde_json::json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": "interceptor",
                "static_configs": [{ "targets": [target.to_string()], "labels": labels }],
            }],
        });
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_string_pretty(&config)?)?;
        let cgroup = node.cgroup("system.slice/prometheus.service")?;
        let child = node
            .command(&cgroup, "prometheus")?
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={}", Self::addr()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
            .spawn()
            .context("cannot start prometheus")?;
        let prometheus = Self {
            child,
            scraper: node.cgroup("system.slice/prometheus-client.service")?,
            dir,
        };
        node.wait_for_listener(Self::addr())
            .context("prometheus did not start listening")?;
        Ok(prometheus)
    }

    pub fn addr() -> SocketAddr {
        SocketAddr::from((NODE_IP, PROMETHEUS_PORT))
    }

    /// The alerts pending or firing now.
    pub async fn alerts(&self, node: &SimNode) -> Result<Vec<Alert>> {
        let answer = self.api(node, "/api/v1/alerts", &[]).await?;
        let alerts = answer["data"]["alerts"].as_array().cloned().unwrap_or_default();
        Ok(alerts
            .iter()
            .map(|alert| {
                let labels: BTreeMap<String, String> = alert["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Alert {
                    name: labels.get("alertname").cloned().unwrap_or_default(),
                    state: alert["state"].as_str().unwrap_or_default().to_owned(),
                    labels,
                }
            })
            .collect())
    }

    /// The result of the instant query `expr` (`data.result`).
    pub async fn query(&self, node: &SimNode, expr: &str) -> Result<Vec<Value>> {
        let answer = self.api(node, "/api/v1/query", &[("query", expr)]).await?;
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// How many times Prometheus has scraped the agent so far (its `up` samples).
    pub async fn scrapes(&self, node: &SimNode) -> Result<usize> {
        let result = self.query(node, "count_over_time(up[1h])").await?;
        Ok(result
            .first()
            .and_then(|sample| sample["value"][1].as_str())
            .and_then(|count| count.parse().ok())
            .unwrap_or(0))
    }

    /// GETs `path` of the HTTP API from inside the node, with `params` URL-encoded.
    async fn api(&self, node: &SimNode, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        let mut command = node.command(&self.scraper, "curl")?;
        command.args(["-sS", "--noproxy", "*", "--max-time", "10", "-G"]);
        for (key, value) in params {
            command.args(["--data-urlencode", &format!("{key}={value}")]);
        }
        command.arg(format!("http://{}{path}", Self::addr()));
        let body = run(command).await?;
        let answer: Value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        ensure!(answer["status"] == "success", "{path}: {body}");
        Ok(answer)
    }

    /// What Prometheus logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
