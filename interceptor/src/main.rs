//! The `interceptor` command.

use std::{ffi::OsString, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use interceptor::{
    agent::{self, AgentArgs, UninstallArgs},
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
}

fn main() -> ExitCode {
    let result = match Cli::parse_from(with_command(std::env::args_os().collect())).command {
        Command::Agent(args) => run_agent(*args),
        Command::Uninstall(args) => agent::uninstall(&args),
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
    telemetry::init_tracing(args.log_format, &args.log_filter())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
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
