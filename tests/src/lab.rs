//! A simulated node with the programs attached: the stand-in metadata service and other listeners a
//! connection may wrongly reach, and agent listeners that attribute every connection they accept.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use interceptor::bpf::{Attribution, Interceptor, RedirectConfig};
use interceptor_common::Counter;

use crate::{
    responder::{Exchange, Responder},
    sim::{METADATA_IP, METADATA_IP6, NODE_IP, Pod, SimNode},
};

/// What the agent listener saw of one connection.
#[derive(Clone, Debug)]
pub struct AgentCall {
    pub exchange: Exchange,
    pub attribution: Option<Attribution>,
}

/// Listeners a connection must reach only when it is not redirected. The one on 169.254.169.254:80 plays
/// the node's metadata service: it records every path asked of it and holds node secrets that no pod
/// may ever see.
pub struct StandIn {
    pub metadata: Responder,
    metadata_paths: Arc<Mutex<Vec<String>>>,
    pub metadata6: Responder,
    pub metadata_other_port: Responder,
    pub node_port_80: Responder,
    pub udp: UdpSocket,
}

impl StandIn {
    pub const METADATA_BODY: &str = "stand-in metadata";
    pub const INSTANCE_ID: &str = "i-0standin0000000001";
    /// What the node's own secrets look like, to search for in everything a pod receives.
    pub const NODE_SECRET: &str = "NODE-SECRET";
    pub const OTHER_PORT: u16 = 8080;
    pub const NODE_ROLE: &str = "node-role";
    pub const NODE_IAM_INFO: &str = r#"{"Code":"Success","InstanceProfileArn":"arn:aws:iam::210987654321:instance-profile/nodes","InstanceProfileId":"AIPANODE"}"#;

    pub fn start(node: &SimNode) -> Result<Self> {
        let respond = |body: &'static str| move |_: &Exchange| body.to_owned();
        let metadata_paths = Arc::new(Mutex::new(Vec::new()));
        let paths = metadata_paths.clone();
        Ok(Self {
            metadata: Responder::spawn(node.bind_tcp((METADATA_IP, 80).into())?, move |exchange| {
                paths.lock().unwrap().push(exchange.path.clone());
                Self::metadata_body(&exchange.path).to_owned()
            }),
            metadata_paths,
            metadata6: Responder::spawn(
                node.bind_tcp((METADATA_IP6, 80).into())?,
                respond(Self::METADATA_BODY),
            ),
            metadata_other_port: Responder::spawn(
                node.bind_tcp((METADATA_IP, Self::OTHER_PORT).into())?,
                respond("stand-in other port"),
            ),
            node_port_80: Responder::spawn(node.bind_tcp((NODE_IP, 80).into())?, respond("stand-in node")),
            udp: node.bind_udp((METADATA_IP, 80).into())?,
        })
    }

    fn metadata_body(path: &str) -> &'static str {
        match path {
            "/latest/meta-data/instance-id" => Self::INSTANCE_ID,
            "/latest/user-data" => "NODE-SECRET user-data: bootstrap token",
            // What the agent's discovery reads: the node's instance profile and role.
            "/latest/meta-data/iam/info" => Self::NODE_IAM_INFO,
            "/latest/meta-data/iam/security-credentials/" => Self::NODE_ROLE,
            p if p.contains("security-credentials") => "NODE-SECRET node credentials",
            _ => Self::METADATA_BODY,
        }
    }

    /// Every path the stand-in metadata service was asked for, in order.
    pub fn metadata_paths(&self) -> Vec<String> {
        self.metadata_paths.lock().unwrap().clone()
    }

    /// Every TCP connection any stand-in listener accepted.
    pub fn tcp_accepted(&self) -> usize {
        [
            &self.metadata,
            &self.metadata6,
            &self.metadata_other_port,
            &self.node_port_80,
        ]
        .iter()
        .map(|responder| responder.accepted())
        .sum()
    }

    /// The next datagram sent to 169.254.169.254:80, waiting at most a few seconds for it to arrive.
    pub fn recv_udp(&self) -> Result<String> {
        self.udp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 512];
        let n = self
            .udp
            .recv(&mut buf)
            .context("no datagram reached the stand-in")?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Fields drop in order: listeners, then the programs, then the node.
pub struct Lab {
    pub stand_in: StandIn,
    agent_listeners: Vec<Responder>,
    calls: Arc<Mutex<Vec<AgentCall>>>,
    pub interceptor: Arc<Interceptor>,
    pub config: RedirectConfig,
    pub node: SimNode,
}

impl Lab {
    /// Attaches the programs with `config` and starts the listeners; agent listeners on every agent
    /// address in `config`. Must run inside a tokio runtime.
    pub fn start(node: SimNode, config: &RedirectConfig) -> Result<Self> {
        let stand_in = StandIn::start(&node)?;
        let interceptor = Arc::new(Interceptor::attach(config)?);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let agent_addrs =
            std::iter::once(SocketAddr::V4(config.agent_v4)).chain(config.agent_v6.map(SocketAddr::V6));
        let agent_listeners = agent_addrs
            .map(|addr| {
                let (interceptor, calls) = (interceptor.clone(), calls.clone());
                let listener = node.bind_tcp(addr)?;
                Ok(Responder::spawn(listener, move |exchange| {
                    let attribution = interceptor.attribute(exchange.peer, exchange.local);
                    let body = match &attribution {
                        Some(found) => format!("agent cgroup={}", found.cgroup_id.0),
                        None => "agent unattributed".to_owned(),
                    };
                    calls.lock().unwrap().push(AgentCall {
                        exchange: exchange.clone(),
                        attribution,
                    });
                    body
                }))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            stand_in,
            agent_listeners,
            calls,
            interceptor,
            config: config.clone(),
            node,
        })
    }

    /// The programs' counter `wanted`, summed over CPUs.
    pub fn counter(&self, wanted: Counter) -> u64 {
        self.interceptor
            .counter(wanted)
            .expect("read the programs' counters")
    }

    /// Every connection the agent listeners accepted so far, in order.
    pub fn agent_calls(&self) -> Vec<AgentCall> {
        self.calls.lock().unwrap().clone()
    }

    pub fn agent_accepted(&self) -> usize {
        self.agent_listeners.iter().map(Responder::accepted).sum()
    }
}

/// The usual start of a test: a node with one pod and one container in it, the programs attached with
/// the node's configuration as `configure` changes it.
pub struct OnePod {
    pub lab: Lab,
    pub pod: Pod,
    pub container: std::path::PathBuf,
}

impl OnePod {
    pub fn start(configure: impl FnOnce(&mut RedirectConfig, &Pod) -> Result<()>) -> Result<Self> {
        let mut node = SimNode::new()?;
        let pod = node.pod()?;
        let container = pod.container()?;
        let mut config = node.redirect_config();
        configure(&mut config, &pod)?;
        let lab = Lab::start(node, &config)?;
        Ok(Self { lab, pod, container })
    }

    /// A command in the pod's network and the container's cgroup.
    pub fn command(&self, program: &str) -> Result<Command> {
        self.pod.command(&self.container, program)
    }

    /// `curl` of `url` from the container.
    pub fn curl(&self, url: &str) -> Result<Command> {
        let mut command = self.command("curl")?;
        command.args(curl_args(url));
        Ok(command)
    }
}

/// Runs a prepared command to completion (bounded) and returns its standard output; fails with its
/// standard error when it exits non-zero.
pub async fn run(command: Command) -> Result<String> {
    run_within(command, Duration::from_secs(60)).await
}

/// [`run`] for a command meant to run longer than a minute (a soak's load): killed past `limit`.
pub async fn run_within(command: Command, limit: Duration) -> Result<String> {
    let described = format!("{command:?}");
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let out = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("{described} did not finish in {} s", limit.as_secs()))?
        .with_context(|| format!("cannot run {described}"))?;
    ensure!(
        out.status.success(),
        "{described} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// curl arguments for one GET that ignores proxy settings and gives up after a few seconds.
pub fn curl_args(url: &str) -> [&str; 6] {
    ["-sS", "--noproxy", "*", "--max-time", "10", url]
}

/// A client process the test talks to line by line: it prints a line when it is ready for the next
/// step and waits for one on its standard input to take it (`sim-client hold`, `connect-then-get`).
pub struct Interactive {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// A client process started with piped standard input and output, killed if dropped early: the
/// process, its input (closing it tells the client to stop) and its output.
pub struct PipedChild {
    pub child: tokio::process::Child,
    pub stdin: Option<tokio::process::ChildStdin>,
    pub stdout: tokio::process::ChildStdout,
}

impl PipedChild {
    pub fn spawn(command: Command) -> Result<Self> {
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        Ok(Self {
            stdin: child.stdin.take(),
            stdout,
            child,
        })
    }
}

/// Closes `stdin` (the client then stops) and waits, at most `within`, for `child` to exit cleanly.
pub async fn stop_client(
    child: &mut tokio::process::Child,
    stdin: &mut Option<tokio::process::ChildStdin>,
    within: Duration,
) -> Result<()> {
    drop(stdin.take());
    let status = tokio::time::timeout(within, child.wait())
        .await
        .with_context(|| format!("the client did not exit within {within:?}"))??;
    ensure!(status.success(), "the client failed: {status}");
    Ok(())
}

impl Interactive {
    /// Starts a prepared command with piped standard input and output; killed if dropped early.
    pub fn spawn(command: Command) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let PipedChild { child, stdin, stdout } = PipedChild::spawn(command)?;
        Ok(Self {
            stdin,
            lines: tokio::io::BufReader::new(stdout).lines(),
            child,
        })
    }

    /// The next line the client prints (bounded); fails when it exits first.
    pub async fn line(&mut self) -> Result<String> {
        tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .context("the client printed nothing for 60 s")??
            .context("the client exited")
    }

    /// Tells the client to take its next step.
    pub async fn go(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().context("the client's input is closed")?;
        stdin.write_all(b"go\n").await?;
        Ok(())
    }

    /// Closes the client's input (a holding client then lets go) and waits for it to exit.
    pub async fn finish(mut self) -> Result<()> {
        stop_client(&mut self.child, &mut self.stdin, Duration::from_secs(60)).await
    }

    /// [`Interactive::finish`], returning the lines the client printed after those already read.
    pub async fn finish_output(mut self) -> Result<Vec<String>> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .context("the client printed nothing for 60 s")??
        {
            rest.push(line);
        }
        stop_client(&mut self.child, &mut self.stdin, Duration::from_secs(60)).await?;
        Ok(rest)
    }
}
