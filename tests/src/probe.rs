//! A client that keeps asking one metadata path (`sim-client probe`), a new connection every 10 ms,
//! as a pod or a node daemon does, and what each attempt got: the status and body, or why it failed.
//! Tests read the records as they come, or all of them at the end.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    lab::{PipedChild, stop_client},
    sim::METADATA_IP,
};

/// What one attempt got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer: its status and the first line of its body.
    Answer { status: u16, body: String },
    /// No answer: the connect or the exchange failed (`sim-client`'s error).
    Failed(String),
}

impl Outcome {
    /// A failed connect the kernel refused (EPERM): the programs refusing while no agent serves.
    pub fn refused_by_the_programs(&self) -> bool {
        matches!(self, Outcome::Failed(error) if error.contains("Operation not permitted"))
    }
}

/// One attempt, with the time it ended (µs since the epoch).
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at_us: u128,
    pub outcome: Outcome,
}

/// `sim-client probe` running, and what it recorded so far.
pub struct Probe {
    records: Arc<Mutex<Vec<Attempt>>>,
    stdin: Option<tokio::process::ChildStdin>,
    child: tokio::process::Child,
    reader: tokio::task::JoinHandle<Result<()>>,
}

impl Probe {
    /// Starts `sim-client probe` of `path` (below 169.254.169.254) from `command`, a `sim-client`
    /// command in a pod's (or the node's) network and a container's cgroup. Each attempt's connect,
    /// and then its answer, may take `timeout`.
    pub fn start(mut command: Command, path: &str, timeout: Duration) -> Result<Self> {
        command.args([
            "probe",
            &format!("{METADATA_IP}:80"),
            "--path",
            path,
            "--pause-ms",
            "10",
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ]);
        let PipedChild { child, stdin, stdout } = PipedChild::spawn(command)?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let reader = tokio::spawn(read_attempts(stdout, records.clone()));
        Ok(Self {
            records,
            stdin,
            child,
            reader,
        })
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.records.lock().unwrap().clone()
    }

    /// Waits (bounded) for an attempt ending after `since_us` that `wanted`, and returns it.
    pub async fn wait_for(&self, since_us: u128, wanted: impl Fn(&Outcome) -> bool) -> Result<Attempt> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = self
                .attempts()
                .into_iter()
                .find(|attempt| attempt.at_us > since_us && wanted(&attempt.outcome))
            {
                return Ok(found);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no such attempt within 60 s; the last: {:?}",
                    self.attempts().last()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the client (its input closes) and returns every attempt it recorded.
    pub async fn finish(mut self) -> Result<Vec<Attempt>> {
        stop_client(&mut self.child, &mut self.stdin, Duration::from_secs(30)).await?;
        self.reader.await??;
        Ok(std::mem::take(&mut *self.records.lock().unwrap()))
    }
}

async fn read_attempts(stdout: tokio::process::ChildStdout, records: Arc<Mutex<Vec<Attempt>>>) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        let (at, rest) = line
            .split_once(' ')
            .with_context(|| format!("a record: {line}"))?;
        let at_us: u128 = at.parse().with_context(|| format!("a record: {line}"))?;
        let outcome = match rest.split_once(' ') {
            Some(("err", error)) => Outcome::Failed(error.to_owned()),
            Some((status, body)) => Outcome::Answer {
                status: status.parse().with_context(|| format!("a record: {line}"))?,
                body: body.to_owned(),
            },
            None => Outcome::Answer {
                status: rest.parse().with_context(|| format!("a record: {line}"))?,
                body: String::new(),
            },
        };
        records.lock().unwrap().push(Attempt { at_us, outcome });
    }
    Ok(())
}

/// Now, in µs since the epoch, as the probes stamp their records.
pub fn now_us() -> u128 {
    crate::load::now_us()
}
