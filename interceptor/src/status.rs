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
//! With `--pod NAMESPACE/NAME` it explains one pod instead ([`report::PodReport`]): its workload as
//! above, its cgroups under the cgroup root (read from the tree, with their ids) and its last requests.
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
//!                    "role_arn": "arn:aws:iam::123456789012:role/cart", "no_role": null,
//!                    "role_from": "annotation iam.amazonaws.com/role of pod shop/cart", "rule": null}],
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

use self::report::{AgentReport, AgentStatus, CgroupStatus, KernelReport, PodReport, Report};
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
    /// Explain one pod instead: the role it gets and where it comes from (its annotation, its
    /// ServiceAccount's, the default role, or the node's credentials), the namespace rule that allowed
    /// or refused it, its cgroups, and its last requests. Exits 1 when the agent knows no such pod.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = PodName::parse)]
    pub pod: Option<PodName>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `--pod`'s argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
        }
    }
}

/// Prints the report; fails (after printing it) when part of the kernel's state could not be read. An
/// agent that does not answer is reported, not a failure.
pub fn run(args: &StatusArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let agent = runtime.block_on(agent_report(PathBuf::from(&args.status_socket)));
    if let Some(pod) = &args.pod {
        return explain_pod(args, pod, agent);
    }
    let kernel = kernel_report(args, agent.status.as_ref());
    let complete = kernel.errors.is_empty();
    let report = Report { kernel, agent };
    print_report(args.output, &report, render::render)?;
    ensure!(
        complete,
        "part of the kernel's state could not be read: see the errors in the report"
    );
    Ok(())
}

/// `--pod`: what the agent says of the pod, and its cgroups as the cgroup tree has them now.
fn explain_pod(args: &StatusArgs, pod: &PodName, agent: AgentReport) -> Result<()> {
    let status = agent.status.with_context(|| {
        format!(
            "the agent at {} does not answer: {}",
            agent.socket.display(),
            agent.error.as_deref().unwrap_or("no answer")
        )
    })?;
    let named = |namespace: &str, name: &str| namespace == pod.namespace && name == pod.name;
    let workload = status
        .workloads
        .iter()
        .find(|workload| {
            workload
                .pod
                .as_ref()
                .is_some_and(|p| named(&p.namespace, &p.name))
        })
        .cloned();
    let cgroup_root = args.cgroup_root.clone().unwrap_or(status.cgroup_root.clone());
    let cgroups = match workload.as_ref().and_then(|workload| workload.pod.as_ref()) {
        Some(known) => pod_cgroups(&cgroup_root, &known.uid),
        None => Vec::new(),
    };
    let requests = status
        .attributions
        .into_iter()
        .filter(|request| request.pod.as_ref().is_some_and(|p| named(&p.namespace, &p.name)))
        .collect();
    let known = workload.is_some();
    let report = PodReport {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        workload,
        cgroups,
        requests,
    };
    print_report(args.output, &report, render::render_pod)?;
    ensure!(
        known,
        "pod {}/{} is not known to the agent on this node",
        pod.namespace,
        pod.name
    );
    Ok(())
}

/// The cgroups under `root` whose path names the pod `uid` (the kubelet's and the runtimes' naming,
/// [`crate::identity::parse_pod_cgroup`]), each with its id, in path order. The tree is read as it is
/// now; a pod that has stopped has none.
fn pod_cgroups(root: &std::path::Path, uid: &str) -> Vec<CgroupStatus> {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = crate::identity::PodUid::parse(uid) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut pending = vec![(root.to_path_buf(), 0)];
    // kubepods/<qos>/pod<uid>/<container>: four levels below the root are enough for every layout.
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if !metadata.is_dir() {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if crate::identity::parse_pod_cgroup(&relative).is_some_and(|cgroup| cgroup.pod_uid == uid) {
                found.push(CgroupStatus {
                    id: metadata.ino(),
                    path: path.clone(),
                });
            }
            if depth < 4 {
                pending.push((path, depth + 1));
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Prints `report` as `output` asks: the table `render` makes of it, or its JSON.
fn print_report<T: serde::Serialize>(output: Output, report: &T, render: fn(&T) -> String) -> Result<()> {
    match output {
        Output::Table => print!("{}", render(report)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).context("cannot encode the report")?
        ),
    }
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
