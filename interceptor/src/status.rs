//! status: the `interceptor status` command, which an operator runs on a node
//! (`kubectl exec ds/interceptor -- interceptor status`) to see what is in place and what the agent
//! did. Two parts:
//! - the kernel's, asked directly so it works with no agent running: the programs attached to the
//!   workload cgroup root at the agent's attach points ([`crate::bpf::inspect`]), and the links and
//!   maps pinned under the agent's bpffs directory with each map's occupancy;
//! - the agent's, asked over its status socket ([`socket`]): readiness, workload sources, the
//!   workloads they know with the role each gets, and the last requests answered
//!   ([`crate::imds::recent`]): who the kernel said made each, and the role or the refusal.
//!
//! No credential, token or key is ever part of it. `--output json` prints [`report::Report`]:
//! ```text
//! {
//!   "kernel": {
//!     "cgroup_root": "/sys/fs/cgroup/kubepods.slice" | null,
//!     "cgroup_root_from": "flag" | "agent" | "detected" | null,
//!     "attached": [{"attach_type": "connect4", "program_id": 812, "name": "connect4"}, ...],
//!     "bpffs_dir": "/sys/fs/bpf/interceptor",
//!     "pins": {
//!       "links": [{"path": ".../v2/links/connect4", "link_id": 31, "program_id": 812}, ...],
//!       "maps": [{"path": ".../v2/maps/CONNECTS_BY_COOKIE", "name": "CONNECTS_BY_COO",
//!                 "map_id": 90, "entries": 3, "max_entries": 65536}, ...],
//!       "unreadable": [{"path": "...", "error": "..."}]
//!     },
//!     "errors": ["..."]
//!   },
//!   "agent": {
//!     "socket": "/run/interceptor/status.sock", "reachable": true, "error": null,
//!     // present when reachable:
//!     "version": "0.1.0", "pid": 1234, "started_at": "2025-01-02T03:04:05Z",
//!     "agent_addr": "10.0.0.1:8181", "cgroup_root": "...", "bpffs_dir": "...",
//!     "ready": true, "not_ready": [],
//!     "sources": [{"kind": "static" | "kubernetes", "from": "<file> | <node>", "synced": true,
//!                  "workloads": 3}],
//!     "workloads": [{"source": "kubernetes", "name": "shop/cart", "cgroup": null,
//!                    "pod": {"namespace": "shop", "name": "cart", "uid": "..."},
//!                    "role_arn": "arn:aws:iam::123456789012:role/cart", "no_role": null}],
//!     "attributions": [{"at": "2025-01-02T03:05:06.1Z", "cgroup_id": 4242, "socket_cookie": 7,
//!                       "pid": 99, "workload": "shop/cart", "pod": {...}, "route": "credentials",
//!                       "status": 200, "role_arn": "arn:...", "reason": null, "error": null}]
//!   }
//! }
//! ```

mod render;
pub mod report;
pub mod socket;

use std::{ffi::OsString, path::PathBuf};

use anyhow::{Context, Result, ensure};

use self::report::{AgentReport, AgentStatus, KernelReport, Report};
use crate::{
    agent::DEFAULT_BPFFS_DIR,
    bpf::inspect::{self, Pins},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables in sections.
    Table,
    /// One JSON document (see the command's long help).
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// cgroup v2 directory whose attached programs are listed [default: the agent's; when it is not
    /// reachable, the kubelet's kubepods cgroup under the cgroup2 mount]
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory of the agent's pins [default: the agent's; when it is not reachable,
    /// /sys/fs/bpf/interceptor]
    #[arg(long, env = "INTERCEPTOR_BPFFS_DIR", value_name = "PATH")]
    pub bpffs_dir: Option<PathBuf>,
    /// The agent's status socket (its --status-socket). Empty: do not ask the agent.
    #[arg(long, env = "INTERCEPTOR_STATUS_SOCKET", value_name = "PATH",
          default_value = socket::DEFAULT_STATUS_SOCKET)]
    pub status_socket: OsString,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints the report; fails (after printing it) when part of the kernel's state could not be read. An
/// agent that does not answer is reported, not a failure.
pub fn run(args: &StatusArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let agent = runtime.block_on(agent_report(PathBuf::from(&args.status_socket)));
    let kernel = kernel_report(args, agent.status.as_ref());
    let complete = kernel.errors.is_empty();
    let report = Report { kernel, agent };
    match args.output {
        Output::Table => print!("{}", render::render(&report)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot encode the report")?
        ),
    }
    ensure!(
        complete,
        "part of the kernel's state could not be read: see the errors in the report"
    );
    Ok(())
}

async fn agent_report(socket: PathBuf) -> AgentReport {
    let answer = if socket.as_os_str().is_empty() {
        Err(anyhow::anyhow!("not asked: --status-socket is empty"))
    } else {
        socket::fetch(&socket).await
    };
    match answer {
        Ok(status) => AgentReport {
            socket,
            reachable: true,
            error: None,
            status: Some(status),
        },
        Err(err) => AgentReport {
            socket,
            reachable: false,
            error: Some(format!("{err:#}")),
            status: None,
        },
    }
}

/// The kernel's part. Where to look comes from the flags, else from the agent, else the defaults.
fn kernel_report(args: &StatusArgs, agent: Option<&AgentStatus>) -> KernelReport {
    let mut errors = Vec::new();
    let (cgroup_root, cgroup_root_from) = match (&args.cgroup_root, agent) {
        (Some(root), _) => (Some(root.clone()), Some("flag")),
        (None, Some(agent)) => (Some(agent.cgroup_root.clone()), Some("agent")),
        (None, None) => match detect_cgroup_root() {
            Ok(root) => (Some(root), Some("detected")),
            Err(err) => {
                errors.push(format!("{err:#}"));
                (None, None)
            }
        },
    };
    let attached = match &cgroup_root {
        Some(root) => inspect::attached_programs(root).unwrap_or_else(|err| {
            errors.push(crate::error_chain(&err));
            Vec::new()
        }),
        None => Vec::new(),
    };
    let bpffs_dir = args
        .bpffs_dir
        .clone()
        .or_else(|| agent.map(|agent| agent.bpffs_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));
    let pins = inspect::pins(&bpffs_dir).unwrap_or_else(|err| {
        errors.push(crate::error_chain(&err));
        Pins::default()
    });
    KernelReport {
        cgroup_root,
        cgroup_root_from,
        attached,
        bpffs_dir,
        pins,
        errors,
    }
}

fn detect_cgroup_root() -> Result<PathBuf> {
    let mount = crate::identity::cgroup2_mount()?;
    crate::agent::detect_kubepods(&mount)
}
