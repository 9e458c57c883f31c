//! The interceptor's BPF programs, attached to the workload cgroup root by the agent:
//! `connect4`/`connect6` redirect connections to intercepted endpoints to the agent and record who made
//! them (or refuse them while no agent serves), `sock_ops` files that record under the connection's
//! 4-tuple, `getpeername4`/`getpeername6` keep the redirect invisible to the caller,
//! `drop_escaped_metadata` (cgroup_skb/egress) drops any packet that still heads for an intercepted
//! endpoint without the redirect, and `bind4`/`bind6` keep workloads off the agent's ports.
#![no_std]
#![no_main]

mod bind;
mod connect;
mod egress;
mod getpeername;
mod maps;
mod sock_addr;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic at run time; the verifier rejects any path that reaches here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
