//! `cargo xtask test`, the README's test command and CI's: installs what is missing (commands, the
//! Python venv with moto, the AWS CLI and boto3, kubectl and helm), builds the BPF object, checks
//! formatting and lints, runs a short smoke of every fuzz target, builds and checks the container
//! image, runs every test in the workspace (the runtime tests run that image), then the privileged tests on each kernel of the matrix in a
//! VM. The privileged tests run for real when this runs as root; with `CI` set they fail loudly if they
//! cannot.

use anyhow::Result;

use crate::{
    build_ebpf::{self, workspace_cargo},
    image_check,
    install::{ensure_commands, run_checked},
    kubectl, python, vm,
};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and `cargo clippy` (for quick local runs).
    #[arg(long)]
    no_lint: bool,
    /// Host suite only: skip the kernel matrix.
    #[arg(long, conflicts_with = "kernel")]
    no_vm: bool,
    /// Only the privileged tests, only in VMs: `all`, or one kernel series (`6.1`, `6.12`).
    #[arg(long, value_name = "SERIES")]
    kernel: Option<String>,
}

/// Commands the tests run, with the Debian packages that provide them. A command may be an absolute
/// path, for what is not on PATH.
pub const TEST_COMMANDS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("systemd-analyze", "systemd"),
    // kube2iam's DNAT rule on the simulated node (tests/tests/migration.rs).
    ("iptables", "iptables"),
    // The tests' own containerd instance (tests/src/containerd.rs): the daemon, its client, the runtime
    // and the CNI plugins, which Debian puts in /usr/lib/cni. The package's service is never started.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    // The runtime tests' pause and workload images (tests/src/oci_archive.rs): Debian's static busybox,
    // and `sim-client` stripped of its debug info.
    ("busybox", "busybox-static"),
    ("strip", "binutils"),
    // The chart's alerts checked and unit-tested (tests/tests/alerts.rs); the package's service is never
    // started.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
];

/// The profile of the agent in the image this checks. A cold release build of the static agent took
/// 23 minutes on two cores (shared with other builds; several minutes at the very best), far over this
/// run's budget; a cold dev build took 3, the whole check 3.2. Both images come from the same sources
/// through the same packaging; `cargo xtask image --check` checks the release one.
const IMAGE_CHECK_PROFILE: &str = "dev";

/// Where the tests find the checked image (`tests/src/cri_node.rs` reads it).
const AGENT_IMAGE_VAR: &str = "INTERCEPTOR_TEST_IMAGE";

pub fn run(options: &Options) -> Result<()> {
    ensure_commands(TEST_COMMANDS)?;
    let venv = python::ensure_venv(python::TEST_TOOLS)?;
    kubectl::ensure_kubectl(&venv)?;
    build_ebpf::run()?;
    if let Some(series) = &options.kernel {
        let image = image_check::run(IMAGE_CHECK_PROFILE)?;
        return vm::run_matrix(series, image.as_deref().map(|image| (AGENT_IMAGE_VAR, image)));
    }
    if !options.no_lint {
        run_checked(workspace_cargo().args(["fmt", "--all", "--", "--check"]))?;
        run_checked(workspace_cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        run_checked(
            build_ebpf::nightly_cargo()
                .args(["clippy"])
                .args(build_ebpf::BPF_BUILD_ARGS)
                .args(["--", "-D", "warnings"]),
        )?;
    }
    crate::fuzz::smoke()?;
    build_ebpf::build_all_targets()?;
    // First, so the tests run the image under containerd (tests/tests/runtime.rs).
    let image = image_check::run(IMAGE_CHECK_PROFILE)?;
    let mut tests = workspace_cargo();
    tests.args(["test", "--all-targets"]);
    if let Some(image) = &image {
        tests.env(AGENT_IMAGE_VAR, image);
    }
    run_checked(&mut tests)?;
    if options.no_vm {
        return Ok(());
    }
    vm::run_matrix("all", image.as_deref().map(|image| (AGENT_IMAGE_VAR, image)))
}
