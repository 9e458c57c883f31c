//! `cgroup/connect4` and `cgroup/connect6`: send TCP connects to an intercepted endpoint to the agent,
//! recording the caller under the socket cookie, or refuse them while no agent serves
//! ([`Mode::Refuse`]); refuse TCP connects straight to the agent's address, and those of a cgroup whose
//! pod holds all the connections the agent allows it (a pod reconnecting in a loop then spends its own
//! time, not the agent's accepts). Every other connect passes untouched.
//!
//! Security beats the usual fail-open of BPF hooks here: when the record cannot be stored, the
//! connection is still redirected, and the agent refuses what it cannot attribute. Nothing aimed at an
//! intercepted endpoint reaches it from a non-exempt cgroup, and nothing in a workload reaches the agent
//! but through the redirect, so no workload can present a 4-tuple of its choosing to the agent.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::error;
use interceptor_common::{
    CgroupId, ConnectRecord, Counter, Endpoint, Mode, NetnsCookie, SocketCookie, redirect_target,
};

use crate::{
    maps::{
        AGENT_V4, AGENT_V6, CONNECTS_BY_COOKIE, count, is_exempt, is_intercepted, is_over_limit, mode,
        reaches_agent,
    },
    sock_addr::{self, ALLOW, IPPROTO_TCP, REFUSE},
};

/// What a connect becomes.
enum Verdict {
    Pass,
    Redirect(Endpoint),
    Refuse,
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    if sock_addr::protocol(&ctx) != IPPROTO_TCP {
        return ALLOW;
    }
    match decide(&ctx, sock_addr::endpoint_v4(&ctx)) {
        Verdict::Pass => ALLOW,
        Verdict::Redirect(target) => {
            sock_addr::set_endpoint_v4(&ctx, &target);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if sock_addr::protocol(&ctx) != IPPROTO_TCP {
        return ALLOW;
    }
    let original = sock_addr::endpoint_v6(&ctx);
    match decide(&ctx, original) {
        Verdict::Pass => ALLOW,
        Verdict::Redirect(target) => {
            if !original.addr.is_ipv4_mapped() && target.addr.is_ipv4_mapped() {
                count(Counter::MappedFallback);
            }
            sock_addr::set_endpoint_v6(&ctx, &target);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
    }
}

/// The decision both families share. Exempt cgroups (the agent's own) pass untouched; connects to an
/// intercepted endpoint go to the agent, after recording the caller, unless no agent serves yet or the
/// agent marked the cgroup over its limit; connects straight to the agent are refused.
fn decide(ctx: &SockAddrContext, original: Endpoint) -> Verdict {
    let intercepted = is_intercepted(&original);
    let direct = !intercepted && reaches_agent(&original);
    if !intercepted && !direct {
        return Verdict::Pass;
    }
    // SAFETY: a helper without preconditions, allowed in cgroup_sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if is_exempt(cgroup_id) {
        if intercepted {
            count(Counter::Exempt);
        }
        return Verdict::Pass;
    }
    if direct {
        count(Counter::DirectRefused);
        return Verdict::Refuse;
    }
    if mode() == Mode::Refuse {
        count(Counter::NotServing);
        return Verdict::Refuse;
    }
    if is_over_limit(cgroup_id) {
        count(Counter::OverLimit);
        return Verdict::Refuse;
    }
    record(ctx, CgroupId(cgroup_id), original);
    count(Counter::Redirected);
    Verdict::Redirect(redirect_target(&original, &AGENT_V4.load(), &AGENT_V6.load()))
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
        // SAFETY: a helper without preconditions.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    if CONNECTS_BY_COOKIE.insert(socket_cookie, record, 0).is_err() {
        count(Counter::RecordFailed);
        error!(
            ctx,
            "cannot record connect of cgroup {}: the agent will refuse it", cgroup_id.0
        );
    }
}
