//! `cgroup/bind4` and `cgroup/bind6`: a workload may not bind one of the agent's ports (the metadata
//! API's and the health server's) in the node's network namespace, on any address: the wildcard, the
//! agent's, or either in IPv4-mapped form. Otherwise a hostNetwork pod could listen where the redirect
//! sends every pod's metadata connections while the agent is down, answer them, and keep the agent from
//! coming back. The programs stay pinned with the rest, so the ports stay guarded while no agent runs.
//! Binds in a pod's own network namespace are the pod's business and pass, as does the agent's own
//! (its cgroup is exempt).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use interceptor_common::{Counter, in_node_netns};

use crate::{
    maps::{NODE_NETNS_COOKIE, count, is_exempt, is_guarded_port},
    sock_addr::{self, ALLOW, IPPROTO_TCP, REFUSE},
};

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    guard(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    guard(&ctx)
}

/// The same for both families: the address does not matter, only the port and the namespace.
fn guard(ctx: &SockAddrContext) -> i32 {
    if sock_addr::protocol(ctx) != IPPROTO_TCP
        || !is_guarded_port(sock_addr::port(ctx))
        || !socket_in_node_netns(ctx)
    {
        return ALLOW;
    }
    // SAFETY: a helper without preconditions, allowed in cgroup_sock_addr programs.
    if is_exempt(unsafe { bpf_get_current_cgroup_id() }) {
        return ALLOW;
    }
    count(Counter::BindRefused);
    REFUSE
}

/// Whether the socket belongs to the node's network namespace, where the agent listens.
fn socket_in_node_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper takes the program's own context, or null for the initial namespace's cookie.
    let (socket_netns, initial_netns) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(core::ptr::null_mut()),
        )
    };
    in_node_netns(socket_netns, NODE_NETNS_COOKIE.load(), initial_netns)
}
