//! interceptor: per-workload AWS IAM credentials through the instance metadata endpoint, with the caller
//! identified by the kernel (cgroup id recorded at connect time) instead of by source IP.
//!
//! Modules follow the data path of DESIGN.md:
//! - [`bpf`]: loads and attaches the BPF programs, owns their links, attributes accepted connections.
//! - [`identity`]: the cgroup v2 filesystem: where it is mounted, which id a cgroup directory has, which
//!   path an id names, and what a kubelet-made path says.
//! - [`workload`]: who a cgroup belongs to and which role it asks for (static file, Kubernetes pods).
//! - [`policy`]: role names and ARNs, external ids, session names: which session a workload gets.
//! - [`creds`]: STS AssumeRole, cached and refreshed per session.
//! - [`imds`]: the metadata HTTP API the redirected callers talk to.
//! - [`telemetry`]: logs, Prometheus metrics, `/healthz` and `/readyz`.
//! - [`agent`]: the `interceptor agent` command: flags, start-up order, shutdown.
//! - [`status`]: the `interceptor status` command: what the kernel has in place and what the agent did.

#[cfg(feature = "kubernetes")]
pub mod agent;
pub mod bpf;
pub mod creds;
pub mod identity;
pub mod imds;
mod periodic;
pub mod policy;
#[cfg(feature = "kubernetes")]
pub mod status;
pub mod telemetry;
pub mod workload;

/// An error and its sources on one line, for log fields.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
