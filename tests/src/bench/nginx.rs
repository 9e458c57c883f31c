//! nginx (Debian's nginx-light) answering every request with one fixed body: the ceiling of an HTTP
//! server with nothing to decide, in a simulated node's network namespace and a cgroup of its own.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};

use crate::sim::SimNode;

/// A running nginx; its master is stopped on drop (it stops its workers), and the node's cgroup tree
/// kills whatever is left.
pub struct Nginx {
    master: Child,
    cgroup: PathBuf,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx on `addr` in `node`, answering `200` with `body` as `text/plain` to every request,
    /// and waits until it accepts connections.
    pub fn start(node: &SimNode, addr: SocketAddrV4, body: &str) -> Result<Self> {
        // The body goes into a single-quoted nginx string, where these would be read as syntax.
        ensure!(
            !body.contains(['\'', '\\', '$']),
            "the fixed reply has characters nginx would interpret: {body:?}"
        );
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nginx.conf");
        let prefix = dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # nginx closes a keep-alive connection after 1000 requests by default; the agent never does.
    keepalive_requests 1000000000;
    server {{
        listen {addr};
        location / {{
            default_type text/plain;
            return 200 '{body}';
        }}
    }}
}}
"
            ),
        )?;
        let cgroup = node.cgroup("system.slice/nginx.service")?;
        let master = node
            .command(&cgroup, "nginx")?
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx (package nginx-light)")?;
        let nginx = Self { master, cgroup, dir };
        node.wait_for_listener(addr.into()).with_context(|| {
            let log = std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
            format!("nginx did not start listening; its error log:\n{log}")
        })?;
        Ok(nginx)
    }
}

impl Nginx {
    /// CPU time the master and its workers have used so far: their cgroup's `usage_usec`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let path = self.cgroup.join("cpu.stat");
        let stat =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let usec = stat
            .lines()
            .find_map(|line| line.strip_prefix("usage_usec ")?.parse().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))?;
        Ok(Duration::from_micros(usec))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits. A pid we spawned and have not reaped.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.master.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.master.wait();
    }
}
