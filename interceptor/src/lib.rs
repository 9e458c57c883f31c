//! interceptor: per-workload AWS IAM credentials through the instance metadata endpoint, with the caller
//! identified by the kernel (cgroup id recorded at connect time) instead of by source IP.
//!
//! Modules follow the data path of DESIGN.md:
//! - [`bpf`]: loads and attaches the BPF programs, owns their links, attributes accepted connections.
//! - [`identity`]: the cgroup v2 filesystem: where it is mounted, which id a cgroup directory has.

pub mod bpf;
pub mod identity;
