//! Every map and load-time global of the programs, and the small accessors the hooks share.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use interceptor_common::{ConnectRecord, ConnectionKey, Counter, Endpoint, sizes};

#[map]
pub static CONNECTS_BY_COOKIE: LruHashMap<u64, ConnectRecord> =
    LruHashMap::with_max_entries(sizes::CONNECTS_BY_COOKIE, 0);

#[map]
pub static CONNECTS_BY_TUPLE: LruHashMap<ConnectionKey, ConnectRecord> =
    LruHashMap::with_max_entries(sizes::CONNECTS_BY_TUPLE, 0);

#[map]
pub static INTERCEPTED: HashMap<Endpoint, u8> = HashMap::with_max_entries(sizes::INTERCEPTED, 0);

#[map]
pub static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(sizes::EXEMPT_CGROUPS, 0);

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
