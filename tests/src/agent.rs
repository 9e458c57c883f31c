//! The real agent binary (`interceptor agent`) running inside the simulated node, in a cgroup of its own
//! outside the workload tree, with JSON logs collected for the tests to read.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::sim::SimNode;

/// The role ARN prefix the tests' agents join role names to (moto's default account).
pub const BASE_ROLE_ARN: &str = "arn:aws:iam::123456789012:role/";
pub const ACCOUNT_ID: &str = "123456789012";
/// An STS endpoint on the node where nothing listens: every AssumeRole fails.
pub const NO_STS: &str = "http://10.99.0.1:5999";

/// A running agent; killed on drop.
pub struct Agent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// The agent executable: `INTERCEPTOR_AGENT_BIN` when set (the demo runs a release build), else
    /// the one `cargo build` put beside the running test or tool.
    pub fn binary() -> Result<PathBuf> {
        if let Some(binary) = std::env::var_os("INTERCEPTOR_AGENT_BIN") {
            return Ok(PathBuf::from(binary));
        }
        crate::built_binary("interceptor")
    }

    /// The agent's own credentials and region come from the environment, as they would from a node's
    /// instance profile; nothing from the host's AWS configuration leaks in.
    pub fn command(node: &SimNode) -> Result<Command> {
        Self::command_in(node, &node.cgroup("system.slice/interceptor.service")?)
    }

    /// [`Agent::command`], with the agent in `cgroup` (a container cgroup of the agent's own pod, as a
    /// DaemonSet runs it).
    pub fn command_in(node: &SimNode, cgroup: &Path) -> Result<Command> {
        Self::command_through(node, cgroup, &[])
    }

    /// [`Agent::command_in`], started through `wrapper` (a program and its arguments, which must exec
    /// the arguments that follow them), e.g. `unshare` for a mount namespace of its own.
    pub fn command_through(node: &SimNode, cgroup: &Path, wrapper: &[&str]) -> Result<Command> {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = node.command(cgroup, program)?;
                command.args(args).arg(Agent::binary()?);
                command
            }
            None => node.command(cgroup, Agent::binary()?)?,
        };
        command
            .arg("agent")
            .arg("--bpffs-dir")
            .arg(node.bpffs_dir())
            // Debug level: the check that no secret is ever logged covers the most verbose logs.
            .args(["--log-format", "json", "--log-level", "debug"]);
        Self::environment(&mut command);
        Ok(command)
    }

    /// The agent executable in `cgroup` on `node` with the agent's environment and no argument at all,
    /// for tests that give it a container's args exactly (a kube2iam DaemonSet's: flags, no command).
    pub fn bare_command(node: &SimNode, cgroup: &Path) -> Result<Command> {
        let mut command = node.command(cgroup, Agent::binary()?)?;
        Self::environment(&mut command);
        Ok(command)
    }

    /// `interceptor status` on `node`, run as an operator runs it there: as root, outside the pods,
    /// with nothing of the host's environment; the caller adds its flags.
    pub fn status_command(node: &SimNode) -> Result<Command> {
        let cgroup = node.cgroup("system.slice/status.service")?;
        let mut command = node.command(&cgroup, Agent::binary()?)?;
        command.env_clear().env("PATH", "/usr/bin:/bin").arg("status");
        Ok(command)
    }

    /// The agent's own credentials and region, as they would come from a node's instance profile;
    /// nothing from the host's AWS configuration leaks in.
    fn environment(command: &mut Command) {
        command
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AWS_ACCESS_KEY_ID", "AKIANODEEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "node-secret-key")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            // Many agents run at once on this host: none takes the host's own status socket
            // (/run/interceptor); the status tests give theirs a path of their own.
            .env("INTERCEPTOR_STATUS_SOCKET", "");
    }

    /// Adds the flags of an agent on `node` that no test here varies: listen on the node's agent
    /// address, attach at its kubepods, the static workload file `workloads`, and an STS endpoint where
    /// nothing listens (tests that need STS run moto, see `deployed`).
    pub fn node_flags<'c>(command: &'c mut Command, node: &SimNode, workloads: &Path) -> &'c mut Command {
        command
            .args(["--agent-addr", &node.agent_v4().to_string()])
            .arg("--cgroup-root")
            .arg(node.kubepods())
            .args(["--sts-endpoint", NO_STS])
            .arg("--workloads")
            .arg(workloads)
    }

    /// Starts `command` (from [`Agent::command`], with the test's flags added) and waits until the agent
    /// logs that it is ready, or fails with its log when it exits first or takes too long.
    pub fn start(command: Command) -> Result<Self> {
        Self::start_until(command, "ready")
    }

    /// Starts `command` and waits until the agent logs a line whose message is `message`.
    pub fn start_until(command: Command, message: &'static str) -> Result<Self> {
        let (child, stderr) = spawn_with_log(command)?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if has_message(&line, message) {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut agent = Self { child, logs };
        // Generous: under emulation (the kernel matrix's VMs) a debug agent takes tens of seconds.
        match ready_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => Ok(agent),
            Err(_) => {
                let status = agent.child.try_wait().ok().flatten();
                bail!(
                    "the agent never logged {message:?} (exit status {status:?}); its log:\n{}",
                    agent.logs().join("\n")
                )
            }
        }
    }

    /// Runs `command` (an agent expected to give up) until it exits, at most two minutes: its exit
    /// status and its log.
    pub fn run_to_exit(command: Command) -> Result<(std::process::ExitStatus, Vec<String>)> {
        let (mut child, stderr) = spawn_with_log(command)?;
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let lines: Vec<String> = BufReader::new(stderr).lines().map_while(Result::ok).collect();
            let _ = lines_tx.send(lines);
        });
        // The log closes when the agent exits.
        let Ok(lines) = lines_rx.recv_timeout(Duration::from_secs(120)) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the agent did not exit within two minutes");
        };
        Ok((child.wait().context("cannot wait for the agent")?, lines))
    }

    /// Stops the agent as the kubelet stops a container (SIGTERM), and waits, at most 30 s, for it to
    /// exit.
    pub fn stop(&mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("a pid")?;
        // SAFETY: kill(2) of our own child, which has not been waited for yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot signal the agent");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                bail!("the agent did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Kills the agent at once (SIGKILL, as a crash or an OOM kill would) and waits for it to exit.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("cannot kill the agent")?;
        self.child.wait().context("cannot wait for the agent")?;
        Ok(())
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Fails when any log line so far contains one of `secrets` (keys, session tokens, IMDS tokens).
    pub fn assert_no_secret_logged(&self, secrets: &[String]) {
        assert!(!secrets.is_empty(), "no secrets to look for");
        for line in self.logs() {
            for secret in secrets {
                assert!(
                    !line.contains(secret.as_str()),
                    "the agent logged a secret: {line}"
                );
            }
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> Result<()> {
        self.wait_for_line(needle, |line| line.contains(needle)).map(drop)
    }

    /// Waits (bounded) until `count` log lines `match`, and returns every matching line so far: the
    /// agent writes a request's line as it answers, so the line may arrive after the answer.
    pub fn wait_for_lines(&self, count: usize, matches: impl Fn(&str) -> bool) -> Vec<String> {
        let matching = || -> Vec<String> { self.logs().into_iter().filter(|line| matches(line)).collect() };
        self.poll_log(|| Some(matching()).filter(|found| found.len() >= count))
            .unwrap_or_else(matching)
    }

    /// Waits (bounded) for the first log line that `matches`, and returns it. The agent's output is
    /// read by another thread, so a line the agent wrote before answering a request may arrive after
    /// the answer: a test looks for it with this, not with [`Agent::logs`].
    pub fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> Result<String> {
        self.poll_log(|| self.logs().into_iter().find(|line| matches(line)))
            .with_context(|| {
                format!(
                    "the agent never logged {what:?}; its log:\n{}",
                    self.logs().join("\n")
                )
            })
    }

    /// Asks `found` every 20 ms until it finds something in the log, for at most 20 s.
    fn poll_log<T>(&self, found: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = found() {
                return Some(found);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts the agent `command` with its log (standard error) piped: the process and its log.
fn spawn_with_log(mut command: Command) -> Result<(Child, std::process::ChildStderr)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("cannot start the agent")?;
    let stderr = child.stderr.take().expect("stderr is piped");
    Ok((child, stderr))
}

pub(crate) fn has_message(line: &str, message: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|entry| entry["message"] == message)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A static workload file in a temporary directory.
pub struct WorkloadFile {
    dir: tempfile::TempDir,
}

impl WorkloadFile {
    pub fn new(entries: &[(&Path, &str)]) -> Result<Self> {
        let file = Self {
            dir: tempfile::tempdir()?,
        };
        file.write(entries)?;
        Ok(file)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("workloads.toml")
    }

    /// Replaces the file's content with one entry per (cgroup directory, role), each named after its
    /// role.
    pub fn write(&self, entries: &[(&Path, &str)]) -> Result<()> {
        let mount = interceptor::identity::cgroup2_mount()?;
        let mut text = String::new();
        for (cgroup, role) in entries {
            let relative = cgroup
                .strip_prefix(&mount)
                .with_context(|| format!("{} is not under {}", cgroup.display(), mount.display()))?;
            text.push_str(&format!(
                "[[workload]]\nname = \"{role}\"\ncgroup = \"{}\"\nrole = \"{role}\"\n\n",
                relative.display()
            ));
        }
        self.write_raw(&text)
    }

    pub fn write_raw(&self, text: &str) -> Result<()> {
        // Written beside and renamed, as a ConfigMap update is: the agent never sees half a file.
        let staging = self.dir.path().join("workloads.toml.new");
        std::fs::write(&staging, text)?;
        std::fs::rename(&staging, self.path())?;
        Ok(())
    }
}
