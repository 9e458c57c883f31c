//! A simulated node as it runs in production: the real agent binary with a static workload file, moto
//! as STS, and the stand-in metadata service on 169.254.169.254 behind it. Pods are created on the node
//! before the agent starts, so the workload file can name their cgroups.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::{
    agent::{Agent, BASE_ROLE_ARN, NO_STS, WorkloadFile},
    lab::{StandIn, run},
    moto::Moto,
    python,
    sim::{NODE_IP, Pod, SimNode},
};

/// Where STS is for the agent.
pub enum Sts {
    Moto,
    /// A port on the node where nothing listens: every AssumeRole fails.
    Down,
}

/// Fields drop in order: the agent (detaching its programs) first, the node last.
pub struct DeployedNode {
    pub agent: Agent,
    agent_args: Vec<OsString>,
    /// The cgroup the agent runs in.
    agent_cgroup: PathBuf,
    pub moto: Option<Moto>,
    pub workloads: WorkloadFile,
    pub stand_in: StandIn,
    pub node: SimNode,
}

impl DeployedNode {
    /// Starts the stand-in, moto (unless STS is down) and the agent with `workloads` as its static file
    /// and `extra_args` added to its flags.
    pub fn start(node: SimNode, workloads: &[(&Path, &str)], sts: Sts, extra_args: &[&str]) -> Result<Self> {
        let agent_cgroup = node.cgroup("system.slice/interceptor.service")?;
        Self::start_in(node, agent_cgroup, workloads, sts, extra_args)
    }

    /// [`DeployedNode::start`] with the agent in `agent_cgroup`.
    pub fn start_in(
        node: SimNode,
        agent_cgroup: PathBuf,
        workloads: &[(&Path, &str)],
        sts: Sts,
        extra_args: &[&str],
    ) -> Result<Self> {
        let stand_in = StandIn::start(&node)?;
        let moto = match sts {
            Sts::Moto => Some(Moto::start(&node)?),
            Sts::Down => None,
        };
        let sts_url = moto.as_ref().map_or_else(|| NO_STS.to_owned(), Moto::url);
        let workload_file = WorkloadFile::new(workloads)?;
        let mut agent_args: Vec<OsString> = vec![
            "--agent-addr".into(),
            node.agent_v4().to_string().into(),
            "--cgroup-root".into(),
            node.kubepods().into(),
            "--sts-endpoint".into(),
            sts_url.into(),
            "--base-role-arn".into(),
            BASE_ROLE_ARN.into(),
            "--workloads".into(),
            workload_file.path().into(),
        ];
        agent_args.extend(extra_args.iter().map(OsString::from));
        let mut command = Agent::command_in(&node, &agent_cgroup)?;
        command.args(&agent_args);
        let agent = Agent::start(command)?;
        Ok(Self {
            agent,
            agent_args,
            agent_cgroup,
            moto,
            workloads: workload_file,
            stand_in,
            node,
        })
    }

    /// Starts the agent again with the same flags, after [`Agent::kill`], and waits until it is ready.
    pub fn restart_agent(&mut self) -> Result<()> {
        self.restart_agent_in(self.agent_cgroup.clone())
    }

    /// [`DeployedNode::restart_agent`] in another cgroup: a restarted container gets a new one.
    pub fn restart_agent_in(&mut self, cgroup: PathBuf) -> Result<()> {
        self.agent = Agent::start(self.agent_command_in(&cgroup)?)?;
        self.agent_cgroup = cgroup;
        Ok(())
    }

    /// The command that starts this node's agent, with its flags, in `cgroup`: a test adds to it.
    pub fn agent_command_in(&self, cgroup: &Path) -> Result<Command> {
        let mut command = Agent::command_in(&self.node, cgroup)?;
        command.args(&self.agent_args);
        Ok(command)
    }

    /// The node's moto; panics when the node was started with STS down.
    pub fn moto(&self) -> &Moto {
        self.moto.as_ref().expect("this node runs moto")
    }
}

/// The node's address of the agent's health server (`--metrics-addr`).
pub const METRICS_PORT: u16 = 9181;

impl DeployedNode {
    /// GETs `path` from the agent's health server, from a process of the node's: `(status, body)`.
    pub async fn health(&self, path: &str) -> Result<(u16, String)> {
        health(&self.node, path).await
    }

    /// The secrets the agent serves `pod` for its role: the access key's secret and the session token
    /// of the cached set (the same set its clients got), and a fresh IMDS token.
    pub async fn secrets_served_to(&self, pod: &Pod, container: &Path) -> Result<Vec<String>> {
        let (_, doc) = credentials_served_to(pod, container).await?;
        let token = put_token(pod, container).await?;
        Ok(vec![
            doc["SecretAccessKey"].as_str().unwrap_or_default().to_owned(),
            doc["Token"].as_str().unwrap_or_default().to_owned(),
            body_of(&token).to_owned(),
        ])
    }
}

/// The role `pod` is given (its role list) and the credentials document served for it.
pub async fn credentials_served_to(pod: &Pod, container: &Path) -> Result<(String, serde_json::Value)> {
    let role = body_of(&curl(pod, container, &[ROLE_LIST]).await?).to_owned();
    let creds = curl(pod, container, &[&format!("{ROLE_LIST}{role}")]).await?;
    ensure!(status_of(&creds) == 200, "{creds}");
    let doc = serde_json::from_str(body_of(&creds))?;
    Ok((role, doc))
}

/// `PUT /latest/api/token` from `pod` with a 60 s TTL, as an SDK asks for an IMDSv2 token: curl's
/// reply (see [`status_of`], [`body_of`]).
pub async fn put_token(pod: &Pod, container: &Path) -> Result<String> {
    curl(
        pod,
        container,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            &format!("{IMDS}/latest/api/token"),
        ],
    )
    .await
}

/// The metadata address as pods call it, and the role list below it.
pub const IMDS: &str = "http://169.254.169.254";
pub const ROLE_LIST: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

/// GETs `path` from the health server of the agent on `node`: `(status, body)`.
pub async fn health(node: &SimNode, path: &str) -> Result<(u16, String)> {
    let cgroup = node.cgroup("system.slice/scraper.service")?;
    let mut command = node.command(&cgroup, "curl")?;
    command.args(["-sS", "-i", "--noproxy", "*", "--max-time", "10"]);
    command.arg(format!("http://{NODE_IP}:{METRICS_PORT}{path}"));
    let response = run(command).await?;
    Ok((status_of(&response), body_of(&response).to_owned()))
}

/// Environment of an AWS client in a pod: no credentials, no profile files, nothing from the host;
/// the SDK's default chain ends at the instance metadata service.
pub fn aws_client_env(command: &mut Command, home: &Path) {
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_PAGER", "");
}

/// `aws sts get-caller-identity` (the AWS CLI) in a container, against `sts_url`: the caller's ARN.
pub async fn aws_cli_caller_arn(pod: &Pod, container: &Path, sts_url: &str) -> Result<String> {
    let home = tempfile::tempdir()?;
    let mut command = pod.command(container, python::tool("aws")?)?;
    aws_client_env(&mut command, home.path());
    command.args([
        "sts",
        "get-caller-identity",
        "--endpoint-url",
        sts_url,
        "--query",
        "Arn",
        "--output",
        "text",
    ]);
    run(command).await
}

/// `curl` in a container: the response head and body, as `curl -i` prints them.
pub async fn curl(pod: &Pod, container: &Path, args: &[&str]) -> Result<String> {
    let mut command = pod.command(container, "curl")?;
    command
        .args(["-sS", "-i", "--noproxy", "*", "--max-time", "10"])
        .args(args);
    run(command).await
}

/// The status code of a `curl -i` output.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// A header of a `curl -i` output, by case-insensitive name.
pub fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
}

/// The body of a `curl -i` output.
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// The role list as `pod` sees it: `(status, body)`.
pub async fn role_list(pod: &Pod, container: &Path) -> Result<(u16, String)> {
    let response = curl(pod, container, &[ROLE_LIST]).await?;
    Ok((status_of(&response), body_of(&response).trim().to_owned()))
}

/// Whether `pod`'s role list comes to answer `expected`: the status, and the body unless the expected
/// one is empty; waiting (bounded) for it.
pub async fn role_list_becomes(pod: &Pod, container: &Path, expected: (u16, &str)) -> bool {
    eventually(|| async {
        role_list(pod, container)
            .await
            .is_ok_and(|(status, body)| status == expected.0 && (expected.1.is_empty() || body == expected.1))
    })
    .await
}

/// A bounded wait for a condition that changes asynchronously (a file reload, say), checked every
/// 50 ms; returns whether it came true.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
