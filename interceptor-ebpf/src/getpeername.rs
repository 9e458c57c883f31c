//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket reports the endpoint it asked
//! for (169.254.169.254:80), not the agent, so clients that check their peer see nothing unusual.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use interceptor_common::Endpoint;

use crate::{
    maps::{CONNECTS_BY_COOKIE, is_agent},
    sock_addr::{self, ALLOW},
};

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx, &sock_addr::endpoint_v4(&ctx)) {
        sock_addr::set_endpoint_v4(&ctx, &original);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx, &sock_addr::endpoint_v6(&ctx)) {
        sock_addr::set_endpoint_v6(&ctx, &original);
    }
    ALLOW
}

/// The endpoint a redirected socket asked for, if this socket was redirected and is still connected
/// to the agent (a TCP socket can disconnect and connect elsewhere; its old record must not lie then).
fn original_destination(ctx: &SockAddrContext, peer: &Endpoint) -> Option<Endpoint> {
    if !is_agent(peer) {
        return None;
    }
    // SAFETY: the helper takes the program's own context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup with a key of the map's type; the value is copied out at once.
    unsafe { CONNECTS_BY_COOKIE.get(socket_cookie) }.map(|record| record.original_dst)
}
