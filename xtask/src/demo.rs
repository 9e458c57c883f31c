//! `sudo cargo xtask demo`: builds the agent (release) and the demo, installs what they need (moto and
//! the AWS CLI in the project venv), then runs the demo (a simulated node with two pods; see
//! `tests/src/bin/demo.rs`).

use anyhow::Result;

use crate::{
    build_ebpf::{self, workspace_cargo, workspace_root},
    install::{ensure_commands, run_checked},
    python, test,
};

pub fn run() -> Result<()> {
    ensure_commands(test::TEST_COMMANDS)?;
    python::ensure_venv(python::TEST_TOOLS)?;
    build_ebpf::run()?;
    // The agent as it would run on a node: a release build.
    run_checked(workspace_cargo().args([
        "build",
        "--release",
        "--package",
        "interceptor",
        "--bin",
        "interceptor",
    ]))?;
    run_checked(workspace_cargo().args(["build", "--package", "interceptor-tests", "--bin", "demo"]))?;
    run_checked(
        std::process::Command::new(workspace_root().join("target/debug/demo")).env(
            "INTERCEPTOR_AGENT_BIN",
            workspace_root().join("target/release/interceptor"),
        ),
    )
}
