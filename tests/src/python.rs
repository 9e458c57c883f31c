//! The project's Python venv (`target/venv`, made by `cargo xtask test`): moto, the AWS CLI, boto3 and
//! the Prometheus client's parser, and kubectl and helm (taken out of a PyPI package into its `bin`).

use std::path::PathBuf;

use anyhow::{Result, ensure};

/// The venv's directory.
pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv")
}

/// A program from the venv's `bin`.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = venv().join("bin").join(name);
    ensure!(
        path.exists(),
        "{} is missing: run `cargo xtask test` (it creates the venv with moto, the AWS CLI and boto3)",
        path.display()
    );
    Ok(path)
}

/// Whether the venv holds what the tests run.
pub fn ready() -> bool {
    let site_packages = venv().join("lib");
    let has_package = |name: &str| {
        std::fs::read_dir(&site_packages)
            .into_iter()
            .flatten()
            .flatten()
            .any(|python| python.path().join("site-packages").join(name).exists())
    };
    ["moto_server", "aws", "python3"]
        .iter()
        .all(|name| venv().join("bin").join(name).exists())
        && has_package("boto3")
        && has_package("prometheus_client")
}

/// kubectl (1.35) from the venv's `bin`.
pub fn kubectl() -> Result<PathBuf> {
    tool("kubectl")
}

/// helm (4) from the venv's `bin`.
pub fn helm() -> Result<PathBuf> {
    tool("helm")
}

/// `true` when kubectl is in the venv; panics under CI when it is not, elsewhere says why the test
/// is skipped.
pub fn has_kubectl(test: &str) -> bool {
    if kubectl().is_ok() {
        return true;
    }
    let why = format!(
        "kubectl in {}: run `cargo xtask test`",
        venv().join("bin").display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run under CI: needs {why}");
    }
    eprintln!("skipping {test}: needs {why}");
    false
}
