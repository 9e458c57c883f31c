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
/// the node's metadata service: it records every path asked of it, answers the paths node daemons read
/// ([`StandIn::NODE_FACTS`]) as EC2 does, and holds node secrets that no pod may ever see, save the
/// node's credentials to the pods the node-credentials setting grants them.
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
    /// The access key of the node's instance-profile credentials.
    pub const NODE_ACCESS_KEY: &str = "ASIANODEINSTANCEROLE";
    /// The node's primary network interface.
    pub const NODE_MAC: &str = "0e:49:61:0f:c3:11";
    /// Paths below the version that node daemons read, and the stand-in's answers, as EC2 gives them.
    pub const NODE_FACTS: &[(&str, &str)] = &[
        ("meta-data/instance-id", Self::INSTANCE_ID),
        ("meta-data/instance-type", "m5.large"),
        ("meta-data/local-ipv4", "10.99.0.1"),
        ("meta-data/mac", Self::NODE_MAC),
        ("meta-data/placement/availability-zone", "us-east-1a"),
        ("meta-data/placement/region", "us-east-1"),
        ("meta-data/tags/instance/", "Name\neks:nodegroup-name"),
        ("meta-data/tags/instance/Name", "node-a"),
        (
            "meta-data/spot/instance-action",
            r#"{"action": "terminate", "time": "2026-11-27T08:22:00Z"}"#,
        ),
        (
            "meta-data/events/maintenance/scheduled",
            r#"[ {"NotBefore" : "21 Jan 2027 09:00:43 GMT", "Code" : "system-reboot", "Description" : "scheduled reboot", "EventId" : "instance-event-0d59937288b749b32", "NotAfter" : "21 Jan 2027 09:17:23 GMT", "State" : "active"} ]"#,
        ),
        ("meta-data/autoscaling/target-lifecycle-state", "InService"),
        ("meta-data/network/interfaces/macs/", "0e:49:61:0f:c3:11/"),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/",
            "device-number\ninterface-id\nlocal-ipv4s\nmac\nsecurity-group-ids\nsubnet-id\nsubnet-ipv4-cidr-block\nvpc-id",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/device-number",
            "0",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/interface-id",
            "eni-0f95d3625f5c521cc",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/local-ipv4s",
            "10.99.0.1\n10.99.0.17\n10.99.0.18",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/security-group-ids",
            "sg-0b5e8e7a1c2d3e4f5",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-id",
            "subnet-0a1b2c3d4e5f60718",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/subnet-ipv4-cidr-block",
            "10.99.0.0/16",
        ),
        (
            "meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/vpc-id",
            "vpc-0c0ffee0c0ffee000",
        ),
        (
            "dynamic/instance-identity/document",
            r#"{"accountId" : "210987654321", "architecture" : "x86_64", "availabilityZone" : "us-east-1a", "imageId" : "ami-0abcdef1234567890", "instanceId" : "i-0standin0000000001", "instanceType" : "m5.large", "privateIp" : "10.99.0.1", "region" : "us-east-1", "version" : "2017-09-30"}"#,
        ),
    ];

    pub fn start(node: &SimNode) -> Result<Self> {
        let respond = |body: &'static str| move |_: &Exchange| body.to_owned();
        let metadata_paths = Arc::new(Mutex::new(Vec::new()));
        let paths = metadata_paths.clone();
        Ok(Self {
            metadata: Responder::spawn(node.bind_tcp((METADATA_IP, 80).into())?, move |exchange| {
                paths.lock().unwrap().push(exchange.path.clone());
                Self::metadata_body(&exchange.path)
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

    /// The answer to `path`, at any version (`/latest/...` or dated).
    fn metadata_body(path: &str) -> String {
        let below_version = path.splitn(3, '/').nth(2).unwrap_or_default();
        if let Some((_, fact)) = Self::NODE_FACTS.iter().find(|(fact, _)| *fact == below_version) {
            return (*fact).to_owned();
        }
        match below_version {
            "user-data" => "NODE-SECRET user-data: bootstrap token".to_owned(),
            // What the agent's discovery reads: the node's instance profile and role.
            "meta-data/iam/info" => Self::NODE_IAM_INFO.to_owned(),
            "meta-data/iam/security-credentials/" => Self::NODE_ROLE.to_owned(),
            "meta-data/iam/security-credentials/node-role" => Self::node_credentials(),
            p if p.contains("security-credentials") => "NODE-SECRET node credentials".to_owned(),
            "dynamic/instance-identity/pkcs7"
            | "dynamic/instance-identity/signature"
            | "dynamic/instance-identity/rsa2048" => "NODE-SECRET signed identity document".to_owned(),
            _ => Self::METADATA_BODY.to_owned(),
        }
    }

    /// The node's instance-profile credentials document, fresh for six hours, as EC2 serves it.
    fn node_credentials() -> String {
        let now = std::time::SystemTime::now();
        let expiration = now + Duration::from_secs(6 * 3600);
        serde_json::json!({
            "Code": "Success",
            "LastUpdated": humantime::format_rfc3339_seconds(now).to_string(),
            "Type": "AWS-HMAC",
            "AccessKeyId": Self::NODE_ACCESS_KEY,
            "SecretAccessKey": "NODE-SECRET-access-key-of-the-instance-profile",
            "Token": "NODE-SECRET-session-token-of-the-instance-profile",
            "Expiration": humantime::format_rfc3339_seconds(expiration).to_string(),
        })
        .to_string()
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
