//! Project tasks: `cargo xtask build-ebpf`, `test`, `demo`, `bench`, `fuzz` and `image`.

mod bench;
mod build_ebpf;
mod demo;
mod fuzz;
mod image;
mod image_check;
mod install;
mod kubectl;
mod oci;
mod python;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build and test tasks for interceptor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the BPF object (nightly, -Z build-std=core, bpf-linker), installing what is missing.
    BuildEbpf,
    /// Install what the tests need, build the BPF object, check formatting and lints, run every test.
    Test(test::Options),
    /// Run the main job on this machine (as root): two simulated pods get two roles from the agent.
    Demo,
    /// Run the benchmarks (as root) on a simulated node: one table of the agent beside baselines from
    /// the same run, also written as JSON under target/bench/.
    Bench(bench::Options),
    /// Run every fuzz target (cargo-fuzz, nightly) for a while and print how many inputs each ran.
    Fuzz(fuzz::Options),
    /// Build the agent's container image (FROM scratch: the static agent and CA certificates) as an OCI
    /// layout, target/image/interceptor-oci, and an oci-archive beside it; print its digest and size.
    Image(image::Options),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::BuildEbpf => build_ebpf::run(),
        Command::Test(options) => test::run(&options),
        Command::Demo => demo::run(),
        Command::Bench(options) => bench::run(&options),
        Command::Fuzz(options) => fuzz::run(&options),
        Command::Image(options) => image::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
