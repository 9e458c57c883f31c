//! Map keys, values, names and sizes shared by the BPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, because the same bytes are read
//! by the kernel side (`interceptor-ebpf`) and by user space (`interceptor::bpf`). Pure decisions that
//! the programs make live here too, so they are unit-tested on the host.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Names of the maps and globals the programs define; user space looks them up by these names.
pub mod names {
    /// Socket cookie -> [`ConnectRecord`](super::ConnectRecord), written at connect time.
    pub const CONNECTS_BY_COOKIE: &str = "CONNECTS_BY_COOKIE";
    /// [`ConnectionKey`](super::ConnectionKey) -> [`ConnectRecord`](super::ConnectRecord), written when
    /// the kernel has chosen the source port; consumed by the agent on accept.
    pub const CONNECTS_BY_TUPLE: &str = "CONNECTS_BY_TUPLE";
    /// [`Endpoint`](super::Endpoint) -> 1 for every address redirected to the agent.
    pub const INTERCEPTED: &str = "INTERCEPTED";
    /// [`InetAddr`](super::InetAddr) -> 1 for the addresses of the intercepted endpoints, whatever the
    /// port: packets to them that cannot be parsed down to a port are dropped.
    pub const INTERCEPTED_ADDRS: &str = "INTERCEPTED_ADDRS";
    /// Cgroup id -> 1 for cgroups whose connections are never redirected (the agent's own).
    pub const EXEMPT_CGROUPS: &str = "EXEMPT_CGROUPS";
    /// Per-CPU [`Counter`](super::Counter) values.
    pub const COUNTERS: &str = "COUNTERS";
    /// Cgroup id (u64) -> u8: cgroups whose pod holds all the metadata connections the agent allows it;
    /// their connects to an intercepted endpoint are refused (EPERM) until the agent lifts it.
    pub const OVER_LIMIT_CGROUPS: &str = "OVER_LIMIT_CGROUPS";
    /// TCP port (u16, host order) -> 1 for the agent's ports (metadata API and health): a workload's
    /// bind to one of them in the node's network namespace is refused (EPERM), so no pod can listen
    /// where the redirect sends metadata connections, nor take the health port.
    pub const GUARDED_PORTS: &str = "GUARDED_PORTS";
    /// Global: the agent's IPv4 [`Endpoint`](super::Endpoint).
    pub const AGENT_V4: &str = "AGENT_V4";
    /// Global: the agent's IPv6 [`Endpoint`](super::Endpoint); port 0 when the agent has none.
    pub const AGENT_V6: &str = "AGENT_V6";
    /// Slot 0 -> the [`Mode`](super::Mode) of the connect programs, as a u32: one array per load,
    /// so the agent switches all its programs at once.
    pub const MODE: &str = "MODE";
    /// Global: the cookie of the node's network namespace (u64), where the agent listens; 0 means the
    /// initial network namespace, which is the node's on every Kubernetes node.
    pub const NODE_NETNS_COOKIE: &str = "NODE_NETNS_COOKIE";
}

/// Map sizes. LRU maps evict the oldest entries instead of failing when full.
pub mod sizes {
    pub const CONNECTS_BY_COOKIE: u32 = 65_536;
    pub const CONNECTS_BY_TUPLE: u32 = 65_536;
    pub const INTERCEPTED: u32 = 16;
    pub const INTERCEPTED_ADDRS: u32 = 16;
    pub const EXEMPT_CGROUPS: u32 = 64;
    pub const OVER_LIMIT_CGROUPS: u32 = 4_096;
    pub const GUARDED_PORTS: u32 = 8;
}

/// What the connect programs do with a connect to an intercepted endpoint (exempt cgroups aside).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Refuse it (EPERM): no agent serves yet. `interceptor guard` attaches the programs so at boot,
    /// and an agent starting where nothing is pinned does before anything else; an agent that cannot
    /// listen puts them back so, rather than leave a redirect to a port it does not hold.
    Refuse = 0,
    /// Send it to the agent, recording the caller.
    Redirect = 1,
}

impl Mode {
    /// The mode a `MODE` slot holds; anything but [`Mode::Redirect`] refuses.
    pub const fn from_value(value: u32) -> Self {
        if value == Mode::Redirect as u32 {
            Mode::Redirect
        } else {
            Mode::Refuse
        }
    }
}

/// The id of a cgroup v2 directory: the inode number the kernel reports from `bpf_get_current_cgroup_id`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

/// The kernel's unique, never reused id of a socket (`bpf_get_socket_cookie`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketCookie(pub u64);

/// The kernel's unique id of a network namespace (`bpf_get_netns_cookie`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetnsCookie(pub u64);

/// An IP address as the kernel stores it in `bpf_sock_addr` and `bpf_sock_ops`: four 32-bit words in
/// network byte order. IPv4 addresses are held in their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), the
/// form a dual-stack socket uses, so one representation serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InetAddr {
    pub words: [u32; 4],
}

/// The third word of an IPv4-mapped address, `00 00 ff ff` in network order.
const V4_MAPPED_MARKER: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl InetAddr {
    /// From an IPv4 address in network byte order, as `user_ip4` and `local_ip4` hold it.
    pub const fn from_ipv4_word(ip4: u32) -> Self {
        Self {
            words: [0, 0, V4_MAPPED_MARKER, ip4],
        }
    }

    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_MARKER
    }

    /// `0.0.0.0` (in its mapped form) or `::`: a connect there reaches the caller's own host.
    pub const fn is_unspecified(&self) -> bool {
        (self.is_ipv4_mapped() || self.words[2] == 0)
            && self.words[3] == 0
            && self.words[0] == 0
            && self.words[1] == 0
    }

    /// The IPv4 address in network byte order, if this is one.
    pub const fn ipv4_word(&self) -> Option<u32> {
        if self.is_ipv4_mapped() {
            Some(self.words[3])
        } else {
            None
        }
    }

    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::from_ipv4_word(u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => {
                let octets = v6.octets();
                let mut words = [0u32; 4];
                for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                    *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
                Self { words }
            }
        }
    }

    /// The address, with IPv4-mapped addresses turned back into IPv4.
    pub fn to_ip(self) -> IpAddr {
        if let Some(ip4) = self.ipv4_word() {
            return IpAddr::V4(Ipv4Addr::from(ip4.to_ne_bytes()));
        }
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(self.words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

/// An address and port: an intercepted destination, or where the agent listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: InetAddr,
    /// Host byte order; 0 marks an unset endpoint.
    pub port: u16,
    pub _pad: u16,
}

impl Endpoint {
    pub const fn new(addr: InetAddr, port: u16) -> Self {
        Self { addr, port, _pad: 0 }
    }

    pub const fn is_set(&self) -> bool {
        self.port != 0
    }
}

/// What the connect hook records about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRecord {
    pub cgroup_id: CgroupId,
    pub netns_cookie: NetnsCookie,
    pub socket_cookie: SocketCookie,
    /// The destination the caller asked for, restored by the getpeername hooks.
    pub original_dst: Endpoint,
    /// The calling process (the kernel's tgid) at connect time.
    pub pid: u32,
    /// When the record was made: `bpf_ktime_get_ns`, the `CLOCK_MONOTONIC` nanoseconds. The agent refuses
    /// a record too old to belong to a connection it is accepting now.
    pub created_ns: u64,
}

/// A TCP connection as both ends see it: the caller's address and the agent's, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub client: Endpoint,
    pub server: Endpoint,
}

/// What the programs count, one slot each in the per-CPU counters map: outcomes of connects, and
/// packets the egress program dropped.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect to an intercepted endpoint was sent to the agent.
    Redirected = 0,
    /// A connect to an intercepted endpoint came from an exempt cgroup and went through unchanged.
    Exempt = 1,
    /// The connect record could not be stored; the connection was still redirected and the agent will
    /// refuse it as unattributed.
    RecordFailed = 2,
    /// The connection's 4-tuple could not be stored (same consequence).
    TupleFailed = 3,
    /// A redirected connection asked for an IPv6 endpoint while the agent has no IPv6 address; it was
    /// sent to the agent's IPv4-mapped address.
    MappedFallback = 4,
    /// A connect from the intercepted subtree straight to the agent's address was refused (EPERM): only
    /// the redirect may bring a workload to the agent, so no workload chooses the 4-tuple it presents.
    DirectRefused = 5,
    /// A TCP packet to an intercepted endpoint left a workload cgroup without the redirect (a raw
    /// socket, or a connection opened before the programs were attached) and was dropped.
    DroppedPacket = 6,
    /// A packet to an intercepted address whose port could not be read (an IPv4 fragment, IPv6
    /// extension headers) was dropped.
    DroppedUnparsed = 7,
    /// A connect to an intercepted endpoint came from a cgroup whose pod holds all the connections the
    /// agent allows it, and was refused (EPERM) without reaching the agent.
    OverLimit = 8,
    /// A connect to an intercepted endpoint was refused (EPERM) because no agent serves yet
    /// ([`Mode::Refuse`]).
    NotServing = 9,
    /// A workload's bind to one of the agent's ports in the node's network namespace was refused
    /// (EPERM).
    BindRefused = 10,
}

/// Which metric family a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// What happened to a connect.
    Connection,
    /// Why a packet was dropped.
    PacketDrop,
    /// Why a bind was refused.
    BindRefusal,
}

impl Counter {
    pub const ALL: [Counter; 11] = [
        Counter::Redirected,
        Counter::Exempt,
        Counter::RecordFailed,
        Counter::TupleFailed,
        Counter::MappedFallback,
        Counter::DirectRefused,
        Counter::DroppedPacket,
        Counter::DroppedUnparsed,
        Counter::OverLimit,
        Counter::NotServing,
        Counter::BindRefused,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The counter's name in metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Exempt => "exempt",
            Counter::RecordFailed => "record_failed",
            Counter::TupleFailed => "tuple_failed",
            Counter::MappedFallback => "mapped_fallback",
            Counter::DirectRefused => "direct_refused",
            Counter::DroppedPacket => "to_intercepted_endpoint",
            Counter::DroppedUnparsed => "unparsed_to_intercepted_address",
            Counter::OverLimit => "over_limit",
            Counter::NotServing => "not_serving",
            Counter::BindRefused => "agent_port",
        }
    }

    pub const fn kind(self) -> CounterKind {
        match self {
            Counter::DroppedPacket | Counter::DroppedUnparsed => CounterKind::PacketDrop,
            Counter::BindRefused => CounterKind::BindRefusal,
            _ => CounterKind::Connection,
        }
    }
}

/// Where a redirected connect goes: IPv4 sockets and IPv4-mapped destinations to the agent's IPv4
/// address (mapped, for an IPv6 socket), native IPv6 destinations to the agent's IPv6 address, or to its
/// IPv4-mapped address when it has none (a dual-stack socket reaches it; a v6-only one fails, closed).
pub const fn redirect_target(original: &Endpoint, agent_v4: &Endpoint, agent_v6: &Endpoint) -> Endpoint {
    if original.addr.is_ipv4_mapped() || !agent_v6.is_set() {
        *agent_v4
    } else {
        *agent_v6
    }
}

/// Whether a socket of the network namespace `socket_netns` is in the node's: the one the agent named
/// (`NODE_NETNS_COOKIE`), or, where it could not tell (0, before Linux 5.14), the initial namespace.
pub const fn in_node_netns(socket_netns: u64, node_netns: u64, initial_netns: u64) -> bool {
    let node = if node_netns == 0 {
        initial_netns
    } else {
        node_netns
    };
    socket_netns == node
}

/// Host-order port from `bpf_sock_addr.user_port`, which holds the network-order port in its low 16 bits.
pub const fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// The value to write into `bpf_sock_addr.user_port` for a host-order port.
pub const fn port_to_user(port: u16) -> u32 {
    port.to_be() as u32
}

/// Host-order port from `bpf_sock_ops.remote_port`, which holds the network-order port in its upper 16
/// bits.
pub const fn port_from_sock_ops_remote(remote_port: u32) -> u16 {
    u16::from_be((remote_port >> 16) as u16)
}

const _: () = assert!(core::mem::size_of::<InetAddr>() == 16);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 56);
const _: () = assert!(core::mem::size_of::<ConnectionKey>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, holds only integers, and its padding is explicit
    // (`_pad` fields or none needed, checked by the size asserts above), so any bit pattern is valid.
    unsafe impl aya::Pod for super::InetAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectionKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn ipv4_round_trips_through_the_mapped_form() {
        let ip: IpAddr = "169.254.169.254".parse().unwrap();
        let addr = InetAddr::from_ip(ip);
        assert!(addr.is_ipv4_mapped());
        assert_eq!(addr.to_ip(), ip);
        assert_eq!(addr.ipv4_word(), Some(u32::from_ne_bytes([169, 254, 169, 254])));
    }

    #[test]
    fn unspecified_addresses_are_recognised_in_both_families() {
        for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            assert!(InetAddr::from_ip(ip.parse().unwrap()).is_unspecified(), "{ip}");
        }
        for ip in ["10.0.0.1", "::1", "::ffff:10.0.0.1", "fd00::"] {
            assert!(!InetAddr::from_ip(ip.parse().unwrap()).is_unspecified(), "{ip}");
        }
    }

    #[test]
    fn ipv6_round_trips_and_is_not_mapped() {
        let ip: IpAddr = "fd00:ec2::254".parse().unwrap();
        let addr = InetAddr::from_ip(ip);
        assert!(!addr.is_ipv4_mapped());
        assert_eq!(addr.to_ip(), ip);
    }

    #[test]
    fn a_mapped_ipv6_address_equals_its_ipv4_form() {
        let mapped: Ipv6Addr = "::ffff:169.254.169.254".parse().unwrap();
        let v4: IpAddr = "169.254.169.254".parse().unwrap();
        assert_eq!(InetAddr::from_ip(IpAddr::V6(mapped)), InetAddr::from_ip(v4));
    }

    #[test]
    fn ports_convert_from_the_kernel_layouts() {
        let port: u16 = 8181;
        assert_eq!(port_from_user(port_to_user(port)), port);
        let remote_port = u32::from(port.to_be()) << 16;
        assert_eq!(port_from_sock_ops_remote(remote_port), port);
    }

    #[test]
    fn redirect_target_picks_the_family() {
        let v4 = Endpoint::new(InetAddr::from_ip("10.0.0.1".parse().unwrap()), 8181);
        let v6 = Endpoint::new(InetAddr::from_ip("fd00::1".parse().unwrap()), 8181);
        let unset = Endpoint::default();
        let imds4 = Endpoint::new(InetAddr::from_ip("169.254.169.254".parse().unwrap()), 80);
        let imds6 = Endpoint::new(InetAddr::from_ip("fd00:ec2::254".parse().unwrap()), 80);
        assert_eq!(redirect_target(&imds4, &v4, &v6), v4);
        assert_eq!(redirect_target(&imds6, &v4, &v6), v6);
        assert_eq!(redirect_target(&imds6, &v4, &unset), v4);
    }

    #[test]
    fn the_nodes_network_is_the_one_named_or_else_the_initial_one() {
        let (initial, node, pod) = (1, 7, 9);
        assert!(in_node_netns(node, node, initial));
        assert!(
            !in_node_netns(initial, node, initial),
            "named: the initial one is not the node's"
        );
        assert!(!in_node_netns(pod, node, initial));
        assert!(in_node_netns(initial, 0, initial), "unnamed: the initial one");
        assert!(!in_node_netns(pod, 0, initial));
    }

    #[test]
    fn only_the_redirect_value_redirects() {
        assert_eq!(Mode::from_value(Mode::Redirect as u32), Mode::Redirect);
        for value in [Mode::Refuse as u32, 2, u32::MAX] {
            assert_eq!(Mode::from_value(value), Mode::Refuse, "{value}");
        }
    }

    #[test]
    fn counters_have_distinct_dense_slots_and_labels() {
        for (slot, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, slot);
        }
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.label(), b.label());
            }
        }
    }
}
