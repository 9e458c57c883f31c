//! `cgroup_skb/egress`: drops every packet a workload cgroup sends to an intercepted metadata endpoint.
//!
//! The connect hooks see only `connect()`. A raw socket (pods have CAP_NET_RAW in many runtimes) builds
//! its own TCP segments, and a connection opened before the programs were attached is already
//! established: neither passes through a connect. Redirected traffic is addressed to the agent by the
//! time it leaves, so any packet still addressed to an intercepted endpoint escaped the redirect and is
//! dropped here. Packets to an intercepted address whose port cannot be read (IPv4 fragments after the
//! first, IPv6 extension headers) are dropped too: what cannot be checked does not pass.

use aya_ebpf::{EbpfContext, helpers::bpf_skb_cgroup_id, macros::cgroup_skb, programs::SkBuffContext};
use interceptor_common::{Counter, Endpoint, InetAddr};

use crate::maps::{count, is_exempt, is_intercepted, is_intercepted_addr};

const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 `frag_off` bits that give the fragment's offset (the rest are flags).
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

/// A packet's destination, as far as it could be read.
enum Destination {
    /// Not an intercepted address, or a protocol that carries no metadata request (UDP, ICMP).
    Elsewhere,
    /// A TCP segment to this endpoint.
    Tcp(Endpoint),
    /// Headed to an intercepted address, but its port could not be read.
    Unparsed,
}

#[cgroup_skb(egress)]
pub fn drop_escaped_metadata(ctx: SkBuffContext) -> i32 {
    let destination = match first_byte(&ctx) >> 4 {
        4 => ipv4_destination(&ctx),
        6 => ipv6_destination(&ctx),
        _ => Destination::Elsewhere,
    };
    let reason = match destination {
        Destination::Elsewhere => return PASS,
        Destination::Tcp(endpoint) if is_intercepted(&endpoint) => Counter::DroppedPacket,
        Destination::Tcp(_) => return PASS,
        Destination::Unparsed => Counter::DroppedUnparsed,
    };
    // SAFETY: the helper takes the program's own context; it reads the cgroup of the packet's socket,
    // which is right even when the kernel sends on the socket's behalf (a retransmit from a timer).
    if is_exempt(unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) }) {
        return PASS;
    }
    count(reason);
    DROP
}

fn first_byte(ctx: &SkBuffContext) -> u8 {
    ctx.load::<u8>(0).unwrap_or(0)
}

fn ipv4_destination(ctx: &SkBuffContext) -> Destination {
    let Ok(dst) = ctx.load::<u32>(16) else {
        return Destination::Elsewhere;
    };
    let addr = InetAddr::from_ipv4_word(dst);
    if !is_intercepted_addr(&addr) {
        return Destination::Elsewhere;
    }
    let (Ok(protocol), Ok(fragment)) = (ctx.load::<u8>(9), ctx.load::<u16>(6)) else {
        return Destination::Unparsed;
    };
    if u16::from_be(fragment) & IPV4_FRAGMENT_OFFSET != 0 {
        return Destination::Unparsed;
    }
    match protocol {
        IPPROTO_TCP => match usize::from(first_byte(ctx) & 0x0f) * 4 {
            // A raw socket may write any header length; one shorter than the fixed header is nonsense.
            header_len if header_len < IPV4_MIN_HEADER_LEN => Destination::Unparsed,
            header_len => tcp_destination(ctx, addr, header_len),
        },
        _ => Destination::Elsewhere,
    }
}

fn ipv6_destination(ctx: &SkBuffContext) -> Destination {
    let Ok(dst) = ctx.load::<[u32; 4]>(24) else {
        return Destination::Elsewhere;
    };
    let addr = InetAddr { words: dst };
    if !is_intercepted_addr(&addr) {
        return Destination::Elsewhere;
    }
    match ctx.load::<u8>(6) {
        Ok(IPPROTO_TCP) => tcp_destination(ctx, addr, IPV6_HEADER_LEN),
        Ok(IPPROTO_UDP | IPPROTO_ICMPV6) => Destination::Elsewhere,
        // Extension headers stand between this header and the port.
        _ => Destination::Unparsed,
    }
}

fn tcp_destination(ctx: &SkBuffContext, addr: InetAddr, header_len: usize) -> Destination {
    match ctx.load::<u16>(header_len + 2) {
        Ok(port) => Destination::Tcp(Endpoint::new(addr, u16::from_be(port))),
        Err(_) => Destination::Unparsed,
    }
}
