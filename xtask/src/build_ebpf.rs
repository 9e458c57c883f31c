//! `cargo xtask build-ebpf`: compiles `interceptor-ebpf` for `bpfel-unknown-none`. The agent's build
//! script embeds the result (target/bpfel-unknown-none/release/interceptor-ebpf).

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::install::{NIGHTLY, ensure_bpf_linker, ensure_rust_src, run_checked};

/// What selects and configures the BPF crate's build, for `cargo build` and `cargo clippy` alike.
pub const BPF_BUILD_ARGS: &[&str] = &[
    "--package",
    "interceptor-ebpf",
    "--release",
    "--target",
    "bpfel-unknown-none",
    "-Z",
    "build-std=core",
];

pub fn run() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    run_checked(nightly_cargo().arg("build").args(BPF_BUILD_ARGS))
}

/// `cargo +nightly` in the workspace, free of the variables the stable cargo running xtask sets (the
/// nested build must choose its own toolchain).
pub fn nightly_cargo() -> Command {
    let mut command = workspace_cargo();
    command
        .arg(format!("+{NIGHTLY}"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    command
}

/// `cargo` run in the workspace root, without the package variables `cargo run` gave xtask itself:
/// build scripts that watch them (ring's) would otherwise rerun, and rebuild everything above them,
/// each time a build alternates between `cargo xtask` and plain `cargo`.
pub fn workspace_cargo() -> Command {
    let mut command = Command::new("cargo");
    command.current_dir(workspace_root());
    for (name, _) in std::env::vars_os() {
        let is_package_variable = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || matches!(
                    name,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if is_package_variable {
            command.env_remove(name);
        }
    }
    command
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds every target of the workspace, the agent binary (`target/debug/interceptor`, with the BPF
/// object embedded) among them, which the end-to-end tests and the demo run. Another package's binary
/// is not built by `cargo test`, so this runs first. It selects exactly what `cargo test --all-targets`
/// selects, so both resolve the same features and share every artifact: a narrower selection
/// (`--package interceptor`) unifies tokio's features differently and builds the whole dependency
/// tree a second time, which once filled CI's disk.
pub fn build_all_targets() -> Result<()> {
    run_checked(workspace_cargo().args(["build", "--all-targets"]))
}
