//! Reads and writes of `bpf_sock_addr` fields, each at the access size the verifier accepts.

use aya_ebpf::programs::SockAddrContext;
use interceptor_common::{Endpoint, InetAddr, port_from_user, port_to_user};

/// Let the syscall proceed, with whatever address the program left in the context.
pub const ALLOW: i32 = 1;
/// Fail the syscall with EPERM.
pub const REFUSE: i32 = 0;
pub const IPPROTO_TCP: u32 = 6;

pub fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a 4-byte read of the kernel's context.
    unsafe { (*ctx.sock_addr).protocol }
}

/// The port of the context's address (the destination in connect, the address in bind), host order.
pub fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: a 4-byte read of user_port.
    port_from_user(unsafe { (*ctx.sock_addr).user_port })
}

fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: a 4-byte write of user_port, allowed in connect and getpeername hooks.
    unsafe { (*ctx.sock_addr).user_port = port_to_user(port) };
}

/// The address of an IPv4 socket's context (the destination in connect4, the peer in getpeername4).
pub fn endpoint_v4(ctx: &SockAddrContext) -> Endpoint {
    // SAFETY: a 4-byte read of user_ip4.
    let ip4 = unsafe { (*ctx.sock_addr).user_ip4 };
    Endpoint::new(InetAddr::from_ipv4_word(ip4), port(ctx))
}

/// The address of an IPv6 socket's context.
pub fn endpoint_v6(ctx: &SockAddrContext) -> Endpoint {
    let mut addr = InetAddr::default();
    for (i, word) in addr.words.iter_mut().enumerate() {
        // SAFETY: one 4-byte read per word of user_ip6; volatile keeps LLVM from merging them into
        // wider loads, which older verifiers refuse on this field.
        *word = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
    }
    Endpoint::new(addr, port(ctx))
}

/// Rewrites an IPv4 socket's address; an endpoint that is not IPv4 is left alone (none reaches here:
/// `redirect_target` gives IPv4 sockets the agent's IPv4 address).
pub fn set_endpoint_v4(ctx: &SockAddrContext, endpoint: &Endpoint) {
    if let Some(ip4) = endpoint.addr.ipv4_word() {
        // SAFETY: a 4-byte write of user_ip4.
        unsafe { (*ctx.sock_addr).user_ip4 = ip4 };
        set_port(ctx, endpoint.port);
    }
}

pub fn set_endpoint_v6(ctx: &SockAddrContext, endpoint: &Endpoint) {
    for (i, word) in endpoint.addr.words.iter().enumerate() {
        // SAFETY: one 4-byte write per word of user_ip6, the access size the verifier allows.
        unsafe { core::ptr::write_volatile(&mut (*ctx.sock_addr).user_ip6[i], *word) };
    }
    set_port(ctx, endpoint.port);
}
