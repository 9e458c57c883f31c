//! The agent as the bench runs it: the tests' command line (see [`crate::agent::Agent`]) with the
//! workload source a node gives it, at the production log level (the tests' debug level logs a line
//! per answered request), its log written to a file, and ready once that file says so.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{Agent, BASE_ROLE_ARN, has_message},
    sim::SimNode,
};

/// A running agent; killed on drop.
/// The per-pod limits a bench agent runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodLimits {
    /// Out of reach: the load tables' loads come from one pod, tens of thousands of requests a
    /// second, and at the default rate would measure the limit.
    OutOfReach,
    /// The agent's defaults, which the flood row measures.
    Defaults,
}

pub struct BenchAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BenchAgent {
    /// Starts the agent on `node` in `cgroup`, listening on the node's agent address and attached at
    /// its kubepods, with `source_flags` choosing where its pods come from (`--kubeconfig <file>
    /// --node <name>` on a node) and `sts_url` as STS, and waits until it is ready: for the Kubernetes
    /// source, once its pods are listed.
    pub fn start(
        node: &SimNode,
        cgroup: &Path,
        sts_url: &str,
        source_flags: &[OsString],
        limits: PodLimits,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut command = Agent::command_in(node, cgroup)?;
        // Later flags override earlier ones: the level a node runs at, not the tests' debug.
        command
            .args(["--agent-addr", &node.agent_v4().to_string()])
            .arg("--cgroup-root")
            .arg(node.kubepods())
            .args(source_flags)
            .args(["--sts-endpoint", sts_url, "--base-role-arn", BASE_ROLE_ARN])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("cannot create the agent's log")?);
        if limits == PodLimits::OutOfReach {
            // Through the environment, which an agent built before the limits (`--agent`) ignores.
            command
                .env("INTERCEPTOR_POD_REQUEST_RATE", "1000000")
                .env("INTERCEPTOR_POD_REQUEST_BURST", "1000000");
        }
        let child = command.spawn().context("cannot start the agent")?;
        let mut agent = Self {
            child,
            log,
            _dir: dir,
        };
        agent.wait_until_ready()?;
        Ok(agent)
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let file = std::fs::File::open(&self.log).context("cannot open the agent's log")?;
            if BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .any(|line| has_message(&line, "ready"))
            {
                return Ok(());
            }
            let exited = self.child.try_wait()?;
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("the agent never logged \"ready\" (exit status {exited:?}); its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
