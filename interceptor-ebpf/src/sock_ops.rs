//! `sock_ops`: once the kernel has chosen the source address and port of a redirected connection
//! (`TCP_CONNECT_CB`), file its connect record under the connection's 4-tuple, the one thing the agent
//! can see of an accepted connection; when that socket closes (`STATE_CB` to `TCP_CLOSE`), delete both
//! of its records. A record lives only as long as the connection that made it, so a later connection
//! that happens to reuse the 4-tuple can never be taken for it.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;

use aya_log_ebpf::error;
use interceptor_common::{ConnectionKey, Counter, Endpoint, InetAddr, port_from_sock_ops_remote};

use crate::maps::{CONNECTS_BY_COOKIE, CONNECTS_BY_TUPLE, count, is_agent};

const AF_INET: u32 = 2;

/// 1 tells the kernel the program ran; it then takes `reply` (left at 0: the kernel's defaults) for
/// the ops that ask for one (TIMEOUT_INIT, RWND_INIT, NEEDS_ECN). 0 would count as a failure.
const SOCK_OPS_OK: u32 = 1;

// Not named `sockops`: that is the section name, and bpf-linker refuses the clash.
#[sock_ops]
pub fn file_connection(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => file_by_tuple(&ctx),
        // args[1] is the state the socket enters.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&ctx),
        _ => {}
    }
    SOCK_OPS_OK
}

fn file_by_tuple(ctx: &SockOpsContext) {
    // Every TCP connect of a workload comes here; only those the connect hook sent to the agent have a
    // record to file. Checked first, from the context alone, so an unrelated connection costs no
    // helper call and no map lookup. (Should a socket redirected once connect elsewhere after a connect
    // that failed before its SYN, its record stays until the socket closes or the LRU drops it: it is
    // keyed by that socket's cookie, which no other socket ever has.)
    let key = connection_key(ctx);
    if !is_agent(&key.server) {
        return;
    }
    // SAFETY: the helper takes the program's own context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a lookup with a key of the map's type; the value is copied out at once.
    let Some(record) = (unsafe { CONNECTS_BY_COOKIE.get(socket_cookie) }).copied() else {
        return;
    };
    // Ask for the state callbacks first, so the close that deletes the records is seen whatever
    // happens next. The flag is per socket: only redirected sockets pay for it.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    if CONNECTS_BY_TUPLE.insert(key, record, 0).is_err() {
        count(Counter::TupleFailed);
        error!(
            ctx,
            "cannot file connection of cgroup {}: the agent will refuse it", record.cgroup_id.0
        );
    }
}

/// The socket is closing (or never connected): its records go. The tuple record is usually gone
/// already, consumed by the agent's accept.
fn forget(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program's own context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CONNECTS_BY_TUPLE.remove(connection_key(ctx));
    let _ = CONNECTS_BY_COOKIE.remove(socket_cookie);
}

/// The 4-tuple in the form the agent builds from its accepted socket. A dual-stack IPv6 socket
/// connecting to an IPv4-mapped address runs as IPv4 underneath, and only its IPv4 fields are set
/// by the time of this callback, so those are read for it.
fn connection_key(ctx: &SockOpsContext) -> ConnectionKey {
    let fields = SocketFields::read(ctx);
    let remote6 = InetAddr {
        words: fields.remote_ip6,
    };
    let (client, server) = if fields.family == AF_INET || remote6.is_ipv4_mapped() {
        (
            InetAddr::from_ipv4_word(fields.local_ip4),
            InetAddr::from_ipv4_word(fields.remote_ip4),
        )
    } else {
        (
            InetAddr {
                words: fields.local_ip6,
            },
            remote6,
        )
    };
    ConnectionKey {
        // local_port is already in host order.
        client: Endpoint::new(client, fields.local_port as u16),
        server: Endpoint::new(server, port_from_sock_ops_remote(fields.remote_port)),
    }
}

/// The context fields the key is built from, all read up front.
///
/// Reading them inside the branches above let LLVM merge the two loads into one through a selected
/// context pointer, which the verifier refuses:
/// `54: (61) r7 = *(u32 *)(r7 +0)  dereference of modified ctx ptr R7 off=28 disallowed`.
/// Volatile loads at fixed offsets, made unconditionally, keep every access a direct one.
struct SocketFields {
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

impl SocketFields {
    fn read(ctx: &SockOpsContext) -> Self {
        let ops = ctx.ops;
        // SAFETY: `ops` is the context the kernel passed in; each read is a 4-byte load of one field,
        // which the verifier allows for sock_ops programs.
        unsafe {
            Self {
                family: read_volatile(&raw const (*ops).family),
                local_ip4: read_volatile(&raw const (*ops).local_ip4),
                remote_ip4: read_volatile(&raw const (*ops).remote_ip4),
                local_ip6: read_words(&raw const (*ops).local_ip6),
                remote_ip6: read_words(&raw const (*ops).remote_ip6),
                local_port: read_volatile(&raw const (*ops).local_port),
                remote_port: read_volatile(&raw const (*ops).remote_port),
            }
        }
    }
}

/// One 4-byte volatile load per word.
///
/// # Safety
/// `words` must point at a readable `[u32; 4]` field of the program's context.
unsafe fn read_words(words: *const [u32; 4]) -> [u32; 4] {
    let first = words.cast::<u32>();
    // SAFETY: the caller guarantees four readable words at `words`.
    unsafe { [0, 1, 2, 3].map(|i| read_volatile(first.add(i))) }
}
