//! Asks the kernel, not the agent's bookkeeping, which BPF programs are attached to a cgroup.

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};

/// The cgroup attach points the agent uses.
pub const AGENT_ATTACH_TYPES: [bpf_attach_type; 8] = [
    bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
    bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
    bpf_attach_type::BPF_CGROUP_INET4_BIND,
    bpf_attach_type::BPF_CGROUP_INET6_BIND,
    bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
    bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
    bpf_attach_type::BPF_CGROUP_SOCK_OPS,
    bpf_attach_type::BPF_CGROUP_INET_EGRESS,
];

/// How many programs the agent attaches: one at each of [`AGENT_ATTACH_TYPES`].
pub const AGENT_PROGRAMS: usize = AGENT_ATTACH_TYPES.len();
/// How many maps the agent pins (`interceptor::bpf::pin::PINNED_MAPS`).
pub const AGENT_PINNED_MAPS: usize = interceptor::bpf::pin::PINNED_MAPS.len();

/// Ids of the programs attached to `cgroup` at `attach_type` (BPF_PROG_QUERY).
pub fn attached_programs(cgroup: &Path, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
    let dir = File::open(cgroup)?;
    let mut ids = [0u32; 64];
    // SAFETY: bpf_attr is a plain C union for which all-zero is the documented "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The union's `query` member is the one BPF_PROG_QUERY reads.
    attr.query.__bindgen_anon_1.target_fd = dir.as_raw_fd() as u32;
    attr.query.attach_type = attach_type as u32;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    // SAFETY: the attr is fully initialised, its prog_ids points at `ids`, which outlives the call and
    // holds prog_cnt entries.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_QUERY as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote the count back into the same union member.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}
