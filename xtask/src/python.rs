//! The project's Python virtual environment (target/venv), for the tools that come from PyPI.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{build_ebpf::workspace_root, install::run_checked};

/// What the tests and the demo run: moto (STS), the AWS CLI and boto3 (clients inside the pods), and
/// the Prometheus client's OpenMetrics parser (to read the agent's /metrics), and kubernetes-validate (the
/// chart's objects checked offline against the Kubernetes schemas).
pub const TEST_TOOLS: &[&str] = &[
    "moto[server]==5.2.5",
    "awscli==1.46.3",
    "boto3==1.44.8",
    "prometheus-client==0.26.0",
    "kubernetes-validate==1.37.0",
];

/// The venv's directory, created when missing, with `requirements` (pip specifiers) installed.
/// pip skips what is already there, so a prepared venv costs one quick pip call.
pub fn ensure_venv(requirements: &[&str]) -> Result<PathBuf> {
    let venv = workspace_root().join("target/venv");
    let pip = venv.join("bin/pip");
    if !pip.exists() {
        println!("xtask: creating the Python venv {}", venv.display());
        run_checked(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run_checked(
        Command::new(&pip)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(requirements),
    )?;
    Ok(venv)
}
