//! `cargo xtask test`, the README's test command and CI's: installs what is missing, builds the BPF
//! object, checks formatting and lints, and runs every test in the workspace. The privileged tests run
//! for real when this runs as root; with `CI` set they fail loudly if they cannot.

use std::process::Command;

use anyhow::Result;

use crate::{
    build_ebpf::{self, workspace_root},
    install::{ensure_commands, run_checked},
};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and `cargo clippy` (for quick local runs).
    #[arg(long)]
    no_lint: bool,
}

/// Commands the privileged tests run, with the Debian packages that provide them.
pub const TEST_COMMANDS: &[(&str, &str)] = &[("ip", "iproute2"), ("curl", "curl")];

pub fn run(options: &Options) -> Result<()> {
    ensure_commands(TEST_COMMANDS)?;
    build_ebpf::run()?;
    let cargo = || {
        let mut command = Command::new("cargo");
        command.current_dir(workspace_root());
        command
    };
    if !options.no_lint {
        run_checked(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run_checked(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        run_checked(
            build_ebpf::nightly_cargo()
                .args(["clippy"])
                .args(build_ebpf::BPF_BUILD_ARGS)
                .args(["--", "-D", "warnings"]),
        )?;
    }
    run_checked(cargo().args(["test", "--all-targets"]))
}
