//! Pods asking for credentials without pause (`sim-client load`), as an SDK does, and what each one
//! recorded: when every attempt ended, the role and AccessKeyId it got or what went wrong, and every
//! distinct set of credentials, so that a test can ask STS whose credentials a pod was served.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

use crate::{
    deployed::{aws_client_env, eventually},
    lab::{PipedChild, run, stop_client},
    python,
    sim::{self, METADATA_IP, SimNode},
};

/// How a load client talks to the metadata service.
#[derive(Clone, Copy, Debug)]
pub struct ClientPath {
    /// All requests on one connection (a new one after an error), or a new connection per request.
    pub keep_alive: bool,
    /// Every request with an IMDSv2 session token.
    pub imds_v2: bool,
}

impl ClientPath {
    pub const NEW_CONNECTIONS: Self = Self {
        keep_alive: false,
        imds_v2: false,
    };
    pub const KEEP_ALIVE: Self = Self {
        keep_alive: true,
        imds_v2: false,
    };

    pub fn with_imds_v2(self) -> Self {
        Self {
            imds_v2: true,
            ..self
        }
    }

    /// What a report calls it.
    pub fn describe(self) -> String {
        let connection = if self.keep_alive {
            "keep-alive"
        } else {
            "new connections"
        };
        if self.imds_v2 {
            format!("{connection}, IMDSv2")
        } else {
            connection.to_owned()
        }
    }
}

/// One attempt of a load client: when it ended (µs since the epoch), and the role and AccessKeyId it
/// got, or what went wrong.
pub struct Attempt {
    pub at_us: u128,
    pub got: Option<(String, String)>,
    pub error: Option<String>,
}

/// What a load client recorded so far.
#[derive(Default)]
pub struct Records {
    pub attempts: Vec<Attempt>,
    /// AccessKeyId -> (SecretAccessKey, Token).
    pub credentials: BTreeMap<String, (String, String)>,
}

impl Records {
    /// How many attempts got credentials.
    pub fn served(&self) -> usize {
        self.attempts
            .iter()
            .filter(|attempt| attempt.got.is_some())
            .count()
    }
}

/// `sim-client load` in a pod's container, asking for credentials until stopped.
pub struct LoadClient {
    path: ClientPath,
    records: Arc<Mutex<Records>>,
    stdin: Option<tokio::process::ChildStdin>,
    child: tokio::process::Child,
    reader: tokio::task::JoinHandle<Result<()>>,
}

impl LoadClient {
    /// Starts asking without pause.
    pub fn start(pod: &sim::Pod, container: &Path, path: ClientPath) -> Result<Self> {
        Self::start_paced(pod, container, path, Duration::ZERO)
    }

    /// Starts asking, `pause` between attempts.
    pub fn start_paced(pod: &sim::Pod, container: &Path, path: ClientPath, pause: Duration) -> Result<Self> {
        let mut command = pod.command(container, crate::built_binary("sim-client")?)?;
        command.args([
            "load",
            &format!("{METADATA_IP}:80"),
            "--pause-ms",
            &pause.as_millis().to_string(),
        ]);
        if path.keep_alive {
            command.arg("--keep-alive");
        }
        if path.imds_v2 {
            command.arg("--imds-v2");
        }
        let PipedChild { child, stdin, stdout } = PipedChild::spawn(command)?;
        let records = Arc::new(Mutex::new(Records::default()));
        let reader = tokio::spawn(read_records(stdout, records.clone()));
        Ok(Self {
            path,
            records,
            stdin,
            child,
            reader,
        })
    }

    pub fn path(&self) -> ClientPath {
        self.path
    }

    /// Whether an attempt that ended after `since_us` got credentials.
    pub fn served_since(&self, since_us: u128) -> bool {
        self.records
            .lock()
            .unwrap()
            .attempts
            .iter()
            .any(|attempt| attempt.at_us > since_us && attempt.got.is_some())
    }

    /// Stops the client (its input closes) and returns everything it recorded.
    pub async fn finish(mut self) -> Result<Records> {
        stop_client(&mut self.child, &mut self.stdin, Duration::from_secs(30)).await?;
        self.reader.await??;
        Ok(std::mem::take(&mut *self.records.lock().unwrap()))
    }
}

async fn read_records(stdout: tokio::process::ChildStdout, records: Arc<Mutex<Records>>) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        let fields: Vec<&str> = line.split(' ').collect();
        let at_us: u128 = fields[0].parse().with_context(|| format!("a record: {line}"))?;
        let mut records = records.lock().unwrap();
        match fields[1..] {
            ["ok", role, key] => records.attempts.push(Attempt {
                at_us,
                got: Some((role.to_owned(), key.to_owned())),
                error: None,
            }),
            ["creds", key, secret, token] => {
                records
                    .credentials
                    .insert(key.to_owned(), (secret.to_owned(), token.to_owned()));
            }
            ["err", ref what @ ..] => records.attempts.push(Attempt {
                at_us,
                got: None,
                error: Some(what.join(" ")),
            }),
            _ => bail!("a record the test does not know: {line}"),
        }
    }
    Ok(())
}

/// Now, in µs since the epoch, as the load clients stamp their records.
pub fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_micros()
}

/// Whether every client got credentials after `since_us`, waiting (bounded) for it.
pub async fn all_served_since(clients: &[&LoadClient], since_us: u128) -> bool {
    eventually(|| async { clients.iter().all(|client| client.served_since(since_us)) }).await
}

/// The ARN STS (moto at `sts_url`) says each of `credentials` belongs to, asked from the node with
/// boto3.
pub async fn caller_arns(
    node: &SimNode,
    sts_url: &str,
    credentials: &BTreeMap<String, (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let cgroup = node.cgroup("system.slice/verify-credentials.service")?;
    let mut command = node.command(&cgroup, python::tool("python3")?)?;
    let home = tempfile::tempdir()?;
    aws_client_env(&mut command, home.path());
    command.args([
        "-c",
        "import json, sys, boto3\n\
         for key, (secret, token) in json.loads(sys.argv[2]).items():\n\
         \x20   sts = boto3.client('sts', endpoint_url=sys.argv[1], aws_access_key_id=key,\n\
         \x20                      aws_secret_access_key=secret, aws_session_token=token)\n\
         \x20   print(key, sts.get_caller_identity()['Arn'])",
        sts_url,
        &serde_json::to_string(credentials)?,
    ]);
    let out = run(command).await?;
    Ok(out
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, arn)| (key.to_owned(), arn.to_owned()))
        .collect())
}
