//! Every map and load-time global of the programs, and the small accessors the hooks share.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use interceptor_common::{ConnectRecord, ConnectionKey, Counter, Endpoint, InetAddr, Mode, sizes};

#[map]
pub static CONNECTS_BY_COOKIE: LruHashMap<u64, ConnectRecord> =
    LruHashMap::with_max_entries(sizes::CONNECTS_BY_COOKIE, 0);

#[map]
pub static CONNECTS_BY_TUPLE: LruHashMap<ConnectionKey, ConnectRecord> =
    LruHashMap::with_max_entries(sizes::CONNECTS_BY_TUPLE, 0);

#[map]
pub static INTERCEPTED: HashMap<Endpoint, u8> = HashMap::with_max_entries(sizes::INTERCEPTED, 0);

#[map]
pub static INTERCEPTED_ADDRS: HashMap<InetAddr, u8> = HashMap::with_max_entries(sizes::INTERCEPTED_ADDRS, 0);

#[map]
pub static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(sizes::EXEMPT_CGROUPS, 0);

#[map]
pub static OVER_LIMIT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(sizes::OVER_LIMIT_CGROUPS, 0);

#[map]
pub static GUARDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(sizes::GUARDED_PORTS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[unsafe(no_mangle)]
pub static AGENT_V4: Global<Endpoint> = Global::new(Endpoint {
    addr: interceptor_common::InetAddr { words: [0; 4] },
    port: 0,
    _pad: 0,
});

#[unsafe(no_mangle)]
pub static AGENT_V6: Global<Endpoint> = Global::new(Endpoint {
    addr: interceptor_common::InetAddr { words: [0; 4] },
    port: 0,
    _pad: 0,
});

/// [`Mode`] as a u32 in its one slot; zeroed (refuse) until the agent sets it, which it does with one
/// write for every program of a load at once.
#[map]
pub static MODE: Array<u32> = Array::with_max_entries(1, 0);

/// The node's network namespace cookie; 0: the initial namespace's.
#[unsafe(no_mangle)]
pub static NODE_NETNS_COOKIE: Global<u64> = Global::new(0);

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is valid and
        // only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Whether `peer` is where the agent listens, in either family.
pub fn is_agent(peer: &Endpoint) -> bool {
    *peer == AGENT_V4.load() || *peer == AGENT_V6.load()
}

/// Whether a connect to `destination` would reach the agent's listener without the redirect: its
/// address, or an unspecified address with its port (the kernel connects those to the caller's own
/// bound address, which on the node's network is the agent's). Nothing, when no agent address is set
/// (`interceptor guard`'s programs).
pub fn reaches_agent(destination: &Endpoint) -> bool {
    let agent = AGENT_V4.load();
    agent.is_set()
        && (is_agent(destination) || (destination.addr.is_unspecified() && destination.port == agent.port))
}

/// Whether connects to the intercepted endpoints go to the agent, or are refused.
pub fn mode() -> Mode {
    Mode::from_value(MODE.get(0).copied().unwrap_or(Mode::Refuse as u32))
}

pub fn is_guarded_port(port: u16) -> bool {
    // SAFETY: a lookup with a key of the map's type; only its presence is used.
    unsafe { GUARDED_PORTS.get(port) }.is_some()
}

pub fn is_intercepted(endpoint: &Endpoint) -> bool {
    // SAFETY: a lookup with a key of the map's type; only its presence is used.
    unsafe { INTERCEPTED.get(endpoint) }.is_some()
}

pub fn is_intercepted_addr(addr: &InetAddr) -> bool {
    // SAFETY: as above.
    unsafe { INTERCEPTED_ADDRS.get(addr) }.is_some()
}

pub fn is_exempt(cgroup_id: u64) -> bool {
    // SAFETY: as above.
    unsafe { EXEMPT_CGROUPS.get(cgroup_id) }.is_some()
}

pub fn is_over_limit(cgroup_id: u64) -> bool {
    // SAFETY: as above.
    unsafe { OVER_LIMIT_CGROUPS.get(cgroup_id) }.is_some()
}
