//! Harness for the privileged end-to-end tests: a simulated node (its own network namespace, with a
//! stand-in metadata service on 169.254.169.254), simulated pods (network namespaces joined to the node
//! by veth pairs, with container cgroups named as the kubelet names them), and HTTP responders that play
//! the agent and the stand-in. Nothing runs in the host's network namespace, so no packet leaves the
//! machine. Every resource is a guard that removes itself on drop, even when a test panics, and names
//! are unique so tests run in parallel. The benchmarks' pieces (`bench`) build on the same node.

pub mod agent;
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod chart;
pub mod containerd;
pub mod cri;
pub mod cri_node;
pub mod daemonset_node;
pub mod deployed;
pub mod exposition;
pub mod kernel;
pub mod kube2iam;
pub mod kube2iam_chart;
pub mod kube_api;
pub mod kube_node;
pub mod kubelet;
pub mod lab;
pub mod load;
pub mod moto;
pub mod netns;
pub mod oci_archive;
pub mod privileged;
pub mod probe;
pub mod prometheus;
pub mod python;
pub mod responder;
pub mod sim;
pub mod sts_proxy;

/// A name unique to this process and call, short enough for interface names.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A binary of the workspace that `cargo build` put beside the running test or tool.
pub fn built_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable without a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let binary = dir.join(name);
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it with `cargo build --all-targets`",
        binary.display()
    );
    Ok(binary)
}
