//! The `interceptor` command.

use std::{ffi::OsString, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use interceptor::{
    agent::{self, AgentArgs, UninstallArgs, guard::GuardArgs},
    status::{self, StatusArgs},
    telemetry,
};

#[derive(Parser)]
#[command(
    version,
    about = "Per-pod AWS IAM credentials through the instance metadata endpoint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the BPF programs and serve the metadata API (run one per node, as root).
    Agent(Box<AgentArgs>),
    /// Detach the programs a stopped agent left pinned and remove its maps (as root).
    Uninstall(UninstallArgs),
    /// Refuse pods' metadata connects and guard the agent's ports until an agent serves (as root)
    ///
    /// Run once at boot, before the kubelet starts: after a reboot nothing is pinned, and the kubelet
    /// starts pods beside the agent, so without it a pod could reach the node's metadata service
    /// before the agent attaches. Pins the programs in --bpffs-dir (on the host's bpffs), attached
    /// to the kubelet's pod cgroup root (made when it does not exist yet), refusing; the agent takes
    /// them over. Does nothing where programs are pinned already.
    Guard(GuardArgs),
    /// Show what is attached where, what is pinned, and what the agent knows and did (as root)
    ///
    /// Two parts. The kernel's, asked directly, so it works with no agent running: the programs
    /// attached to the workload cgroup root at the agent's attach points (id, name, attach type),
    /// and the links and maps pinned under the agent's bpffs directory, each map with how many entries
    /// it holds of its maximum. The agent's, asked over its status socket (the agent's
    /// --status-socket): readiness, workload sources, the workloads they know with the role each gets,
    /// and the last 32 metadata requests: when, the caller's cgroup id, its pod (or static workload),
    /// the role ARN or the refusal's reason, and the HTTP status. No credential, token or key is ever
    /// shown.
    ///
    /// Where to look: --cgroup-root and --bpffs-dir when given, else what the agent reports, else the
    /// defaults (the kubepods cgroup, /sys/fs/bpf/interceptor).
    ///
    /// Exit status: 0 when the kernel's part was read, whether the agent answered or not (the report
    /// says "not reachable" and why); 1 when part of the kernel's state could not be read (the report
    /// is still printed, with `errors`), or on bad flags.
    ///
    /// `--output json` prints one document:
    /// {"kernel": {"cgroup_root", "cgroup_root_from" (flag|agent|detected), "attached": [{"attach_type",
    /// "program_id", "name"}], "bpffs_dir", "pins": {"links": [{"path", "link_id", "program_id"}],
    /// "maps": [{"path", "name", "map_id", "entries", "max_entries"}], "unreadable": [{"path",
    /// "error"}]}, "errors": [..]},
    /// "agent": {"socket", "reachable", "error", and when reachable: "version", "pid", "started_at",
    /// "agent_addr", "cgroup_root", "bpffs_dir", "ready", "not_ready": [..], "sources": [{"kind"
    /// (static|kubernetes), "from", "synced", "workloads"}], "workloads": [{"source", "name", "cgroup",
    /// "pod": {"namespace", "name", "uid"}, "role_arn", "no_role"}], "attributions" (newest first):
    /// [{"at", "cgroup_id", "socket_cookie", "pid", "workload", "pod", "route", "status", "role_arn",
    /// "reason", "error"}]}}
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse_from(with_command(std::env::args_os().collect())).command {
        Command::Agent(args) => run_agent(*args),
        Command::Uninstall(args) => agent::uninstall(&args),
        Command::Guard(args) => agent::guard::run(&args),
        Command::Status(args) => status::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Flags without a command run the agent: a kube2iam DaemonSet's container args (flags only) start it
/// unchanged when only the image changes.
fn with_command(mut args: Vec<OsString>) -> Vec<OsString> {
    let flags_only = args
        .get(1)
        .and_then(|first| first.to_str())
        .is_some_and(|first| first.starts_with("--") && !matches!(first, "--help" | "--version"));
    if flags_only {
        args.insert(1, "agent".into());
    }
    args
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    interceptor::heap::give_back_large_blocks();
    telemetry::init_tracing(args.log_format, &args.log_filter())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.get())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(agent::run(args)).inspect_err(|err| {
        // The log is where operators look; standard error gets the plain line too.
        tracing::error!(error = format!("{err:#}"), "agent failed");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_without_a_command_run_the_agent() {
        let kube2iam = args(&["interceptor", "--host-interface=eni+", "--node=n"]);
        assert_eq!(
            with_command(kube2iam),
            args(&["interceptor", "agent", "--host-interface=eni+", "--node=n"])
        );
        for unchanged in [
            &["interceptor", "agent", "--node=n"][..],
            &["interceptor", "uninstall"],
            &["interceptor", "status", "--output", "json"],
            &["interceptor", "--version"],
            &["interceptor", "--help"],
            &["interceptor"],
        ] {
            assert_eq!(with_command(args(unchanged)), args(unchanged));
        }
        let parsed = Cli::try_parse_from(with_command(args(&[
            "interceptor",
            "--iptables=true",
            "--node=n",
        ])));
        assert!(matches!(parsed.map(|cli| cli.command), Ok(Command::Agent(_))));
    }
}
