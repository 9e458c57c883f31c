//! The agent as the bench runs it: the tests' command line (see [`crate::agent::Agent`]) at the
//! production log level, its log written to a file instead of kept in memory (it logs a line per
//! request, hundreds of thousands in a run), and ready once that file says so.

use std::{
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
pub struct BenchAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BenchAgent {
    /// Starts the agent on `node` in `cgroup`, with `sts_url` as STS and `workloads` as its static
    /// file, and waits until it is ready.
    pub fn start(node: &SimNode, cgroup: &Path, sts_url: &str, workloads: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut command = Agent::command_in(node, cgroup)?;
        Agent::node_flags(&mut command, node, workloads);
        // Later flags override earlier ones: a real STS, and the level a node runs at, not debug.
        command
            .args(["--sts-endpoint", sts_url, "--base-role-arn", BASE_ROLE_ARN])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("cannot create the agent's log")?);
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
