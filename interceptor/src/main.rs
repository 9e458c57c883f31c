//! The `interceptor` command.

use std::process::ExitCode;

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
    let result = match Cli::parse().command {
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

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    telemetry::init_tracing(args.log_format, &args.log_level)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(agent::run(args)).inspect_err(|err| {
        // The log is where operators look; standard error gets the plain line too.
        tracing::error!(error = format!("{err:#}"), "agent failed");
    })
}
