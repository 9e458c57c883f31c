//! moto as the node's STS: a `moto_server` inside the simulated node, on the node's address so both
//! the agent and the pods' AWS clients reach it. It records every request it serves, so tests count
//! AssumeRole calls where they arrive rather than in the agent's own bookkeeping.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
};

use anyhow::{Context, Result};
use base64::Engine;

use crate::{
    python,
    sim::{NODE_IP, SimNode},
};

pub const MOTO_PORT: u16 = 5000;

pub struct Moto {
    child: Child,
    recording: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto in the node's namespace and a cgroup of its own, and waits until it accepts
    /// connections.
    pub fn start(node: &SimNode) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let recording = dir.path().join("recording.jsonl");
        let cgroup = node.cgroup("system.slice/moto.service")?;
        let mut command = node.command(&cgroup, python::tool("moto_server")?)?;
        command
            .args(["-H", &NODE_IP.to_string(), "-p", &MOTO_PORT.to_string()])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("MOTO_ENABLE_RECORDING", "1")
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moto.log"))?);
        let child = command.spawn().context("cannot start moto_server")?;
        let moto = Self {
            child,
            recording,
            _dir: dir,
        };
        node.wait_for_listener(moto.addr())
            .context("moto_server did not start listening")?;
        moto.warm_up(node, &cgroup)?;
        Ok(moto)
    }

    /// moto imports a service's code on its first request to it, which can take more than a second on
    /// a busy machine: longer than the SDKs wait for the metadata service, behind which a pod's first
    /// AssumeRole runs. One GetCallerIdentity (not counted as an AssumeRole) loads STS's code first.
    fn warm_up(&self, node: &SimNode, cgroup: &std::path::Path) -> Result<()> {
        let status = node
            .command(cgroup, "curl")?
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "--noproxy",
                "*",
                "--max-time",
                "60",
                "-X",
                "POST",
            ])
            .args([
                "--data",
                "Action=GetCallerIdentity&Version=2011-06-15",
                &self.url(),
            ])
            .stdout(Stdio::null())
            .status()
            .context("cannot run curl to warm moto up")?;
        anyhow::ensure!(
            status.success(),
            "moto did not answer GetCallerIdentity: {status}"
        );
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((NODE_IP, MOTO_PORT))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// How many STS AssumeRole requests moto has received so far.
    pub fn assume_role_calls(&self) -> Result<usize> {
        Ok(self.assume_role_requests()?.len())
    }

    /// The form fields of every STS AssumeRole request moto has received so far, in order: what the
    /// agent sent, as STS would read it (`RoleSessionName`, `Tags.member.1.Key`, ...).
    pub fn assume_role_requests(&self) -> Result<Vec<Vec<(String, String)>>> {
        let text = match std::fs::read_to_string(&self.recording) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).context("cannot read moto's recording"),
        };
        let mut requests = Vec::new();
        for line in text.lines() {
            let entry: serde_json::Value = serde_json::from_str(line).context("moto recording line")?;
            let body = entry["body"].as_str().unwrap_or_default();
            let body = if entry["body_encoded"].as_bool() == Some(true) {
                base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .context("moto recording body")?
            } else {
                body.as_bytes().to_vec()
            };
            let fields: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
            if fields
                .iter()
                .any(|(key, value)| key == "Action" && value == "AssumeRole")
            {
                requests.push(fields);
            }
        }
        Ok(requests)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
