//! `cgroup/connect4` and `cgroup/connect6`: send TCP connects to an intercepted endpoint to the agent,
//! recording the caller under the socket cookie. Every other connect passes untouched.
//!
//! Security beats the usual fail-open of BPF hooks here: when the record cannot be stored, the
//! connection is still redirected, and the agent refuses what it cannot attribute. Nothing aimed at an
//! intercepted endpoint reaches it from a non-exempt cgroup.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::error;
use interceptor_common::{
    CgroupId, ConnectRecord, Counter, Endpoint, NetnsCookie, SocketCookie, redirect_target,
};

use crate::{
    maps::{AGENT_V4, AGENT_V6, CONNECTS_BY_COOKIE, EXEMPT_CGROUPS, INTERCEPTED, count},
    sock_addr,
};

/// Let the syscall proceed, with whatever address the program left in the context.
const ALLOW: i32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    if sock_addr::protocol(&ctx) == IPPROTO_TCP
        && let Some(target) = redirect(&ctx, sock_addr::endpoint_v4(&ctx))
    {
        sock_addr::set_endpoint_v4(&ctx, &target);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if sock_addr::protocol(&ctx) != IPPROTO_TCP {
        return ALLOW;
    }
    let original = sock_addr::endpoint_v6(&ctx);
    if let Some(target) = redirect(&ctx, original) {
        if !original.addr.is_ipv4_mapped() && target.addr.is_ipv4_mapped() {
            count(Counter::MappedFallback);
        }
        sock_addr::set_endpoint_v6(&ctx, &target);
    }
    ALLOW
}

/// The decision both families share: `Some(agent endpoint)` when this connect must go to the agent,
/// after recording the caller.
fn redirect(ctx: &SockAddrContext, original: Endpoint) -> Option<Endpoint> {
    // SAFETY: a lookup with a key of the map's type; only its presence is used.
    unsafe { INTERCEPTED.get(original) }?;
    // SAFETY: a helper without preconditions, allowed in cgroup_sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: as for INTERCEPTED above.
    if unsafe { EXEMPT_CGROUPS.get(cgroup_id) }.is_some() {
        count(Counter::Exempt);
        return None;
    }
    record(ctx, CgroupId(cgroup_id), original);
    count(Counter::Redirected);
    Some(redirect_target(&original, &AGENT_V4.load(), &AGENT_V6.load()))
}

fn record(ctx: &SockAddrContext, cgroup_id: CgroupId, original_dst: Endpoint) {
    // SAFETY: both helpers take the program's own context, as the kernel requires.
    let (socket_cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let record = ConnectRecord {
        cgroup_id,
        netns_cookie: NetnsCookie(netns_cookie),
        socket_cookie: SocketCookie(socket_cookie),
        original_dst,
        pid: ctx.tgid(),
    };
    if CONNECTS_BY_COOKIE.insert(socket_cookie, record, 0).is_err() {
        count(Counter::RecordFailed);
        error!(
            ctx,
            "cannot record connect of cgroup {}: the agent will refuse it", cgroup_id.0
        );
    }
}
