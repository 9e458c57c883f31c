//! The `interceptor` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use interceptor::{
    agent::{self, AgentArgs},
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
}

fn main() -> ExitCode {
    let Command::Agent(args) = Cli::parse().command;
    if let Err(err) = telemetry::init_tracing(args.log_format, &args.log_level) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(*args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}
