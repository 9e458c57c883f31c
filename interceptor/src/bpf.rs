//! bpf: the one module that touches aya. Loads the embedded BPF object, attaches its programs to the
//! workload cgroup root (or swaps them into the links a previous agent pinned), owns their links
//! (dropping the [`Interceptor`] detaches them unless they are pinned), forwards the programs' aya-log
//! records to `tracing`, and answers "which cgroup made this accepted connection?".

pub mod inspect;
pub mod metrics;
pub mod pin;
mod sys;

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use self::pin::PinDir;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, Program, ProgramError, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use aya_log::EbpfLogger;
pub use interceptor_common::Mode;
use interceptor_common::{
    CgroupId, ConnectRecord, ConnectionKey, Counter, Endpoint, InetAddr, NetnsCookie, SocketCookie, names,
    sizes,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    task::JoinHandle,
};

/// The BPF object `cargo xtask build-ebpf` produced when this binary was built; empty when there was none.
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("INTERCEPTOR_EBPF_EMBEDDED"));

/// Whether this build carries the BPF object (`cargo xtask build-ebpf` ran before it was built).
pub fn object_embedded() -> bool {
    !EMBEDDED_OBJECT.is_empty()
}

const SOCK_OPS_PROGRAM: &str = "file_connection";
const EGRESS_PROGRAM: &str = "drop_escaped_metadata";
/// The programs that redirect or refuse connects, and write the connect records.
const CONNECT_PROGRAMS: [&str; 2] = ["connect4", "connect6"];
/// The programs beside them: those that read the records, and the bind guard.
const SUPPORTING_PROGRAMS: [&str; 6] = [
    SOCK_OPS_PROGRAM,
    EGRESS_PROGRAM,
    "getpeername4",
    "getpeername6",
    "bind4",
    "bind6",
];
/// Every program of the object, by function name, each attached to the cgroup root (in
/// [`attach_order`]) and its link pinned under this name: the supporting programs, then the connect
/// programs, the order in which an agent's links are released.
pub const PROGRAMS: [&str; 8] = [
    SUPPORTING_PROGRAMS[0],
    SUPPORTING_PROGRAMS[1],
    SUPPORTING_PROGRAMS[2],
    SUPPORTING_PROGRAMS[3],
    SUPPORTING_PROGRAMS[4],
    SUPPORTING_PROGRAMS[5],
    CONNECT_PROGRAMS[0],
    CONNECT_PROGRAMS[1],
];

/// A connect record older than this at accept belongs to no connection the agent is accepting now: the
/// programs delete a record when its socket closes, and a caller's connection is accepted within
/// milliseconds (callers give up after a second). Refusing older ones bounds what any record that
/// escaped deletion could ever do.
pub const MAX_RECORD_AGE: Duration = Duration::from_secs(5);

/// EC2's instance metadata endpoints, IPv4 and IPv6.
pub const METADATA_V4: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80));
pub const METADATA_V6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    80,
    0,
    0,
));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this build of the agent has no BPF object embedded: run `cargo xtask build-ebpf`, then rebuild the agent"
    )]
    NotEmbedded,
    #[error("the BPF programs must be attached from inside a tokio runtime (their log forwarder is a task)")]
    NoRuntime,
    #[error("cannot load the BPF object")]
    Load(#[source] EbpfError),
    #[error("BPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("BPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF link of program {name}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("cannot ask the kernel which programs are attached to {path} at {attach_type}")]
    Query {
        attach_type: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the cgroup root {path}")]
    CgroupRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("BPF map {name} is not of the type this agent expects")]
    WrongMapType { name: &'static str },
    #[error("BPF map {name}")]
    Syscall {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot forward BPF logs")]
    Logger(#[source] io::Error),
    #[error("{path} is not on a bpffs mount (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("bpffs directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinned link {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the programs need to know: where to attach, what to intercept, where to send it, whom to spare.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// The cgroup v2 directory whose whole subtree is intercepted.
    pub cgroup_root: PathBuf,
    /// Whether connects to the intercepted endpoints go to the agent, or are refused.
    pub mode: Mode,
    /// Where redirected IPv4 connections (and IPv4-mapped ones of dual-stack sockets) go. With no
    /// agent address at all (`interceptor guard`), its port is 0: nothing is redirected, and connects
    /// straight to an agent are not told apart.
    pub agent_v4: SocketAddrV4,
    /// Where redirected native IPv6 connections go; without it they go to the IPv4-mapped `agent_v4`.
    pub agent_v6: Option<SocketAddrV6>,
    /// Destinations redirected to the agent.
    pub intercepted: Vec<SocketAddr>,
    /// Cgroups whose connections are never redirected: the agent's own.
    pub exempt_cgroups: Vec<CgroupId>,
    /// TCP ports no workload may bind in the node's network namespace: the agent's.
    pub guarded_ports: Vec<u16>,
    /// The cookie of the node's network namespace, where `guarded_ports` are guarded; `None`: the
    /// initial namespace, which is the node's on every Kubernetes node (the kernel cannot tell a
    /// namespace's cookie before 5.14: see [`netns_cookie`]).
    pub node_netns_cookie: Option<u64>,
    /// Where to pin the links and shared maps (a bpffs directory), so the programs outlive this
    /// process and the next agent takes over from them; `None`: they are detached on drop.
    pub pin_dir: Option<PathBuf>,
    /// Size of each connection map (LRU; the oldest records are evicted, which leaves their
    /// connections unattributed, never misattributed). Pinned maps keep the size they were made with.
    pub connection_map_entries: u32,
}

impl RedirectConfig {
    /// Redirects EC2's metadata endpoints to `agent_v4`, guards its port, and exempts nothing.
    pub fn new(cgroup_root: PathBuf, agent_v4: SocketAddrV4) -> Self {
        Self {
            cgroup_root,
            mode: Mode::Redirect,
            agent_v4,
            agent_v6: None,
            intercepted: vec![METADATA_V4, METADATA_V6],
            exempt_cgroups: Vec::new(),
            guarded_ports: vec![agent_v4.port()],
            node_netns_cookie: None,
            pin_dir: None,
            connection_map_entries: sizes::CONNECTS_BY_TUPLE,
        }
    }

    /// Refuses connects to EC2's metadata endpoints from the whole subtree of `cgroup_root`, and
    /// guards `guarded_ports`, with no agent address at all (`interceptor guard`'s): what holds until
    /// an agent serves.
    pub fn guard(cgroup_root: PathBuf, guarded_ports: Vec<u16>) -> Self {
        Self {
            guarded_ports,
            ..Self::new(cgroup_root, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).refusing()
        }
    }

    /// The same configuration, refusing.
    pub fn refusing(&self) -> Self {
        Self {
            mode: Mode::Refuse,
            ..self.clone()
        }
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+); `None` where the
/// kernel cannot tell it.
pub fn netns_cookie() -> io::Result<Option<u64>> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        return Ok(Some(cookie));
    }
    match io::Error::last_os_error() {
        err if err.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        err => Err(err),
    }
}

/// Who made a redirected connection, as the kernel recorded it at connect time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribution {
    pub cgroup_id: CgroupId,
    pub socket_cookie: SocketCookie,
    pub netns_cookie: NetnsCookie,
    /// The calling process (thread group id) at connect time.
    pub pid: u32,
    /// The endpoint the caller asked for.
    pub original_dst: SocketAddr,
}

impl From<ConnectRecord> for Attribution {
    fn from(record: ConnectRecord) -> Self {
        Self {
            cgroup_id: record.cgroup_id,
            socket_cookie: record.socket_cookie,
            netns_cookie: record.netns_cookie,
            pid: record.pid,
            original_dst: SocketAddr::new(record.original_dst.addr.to_ip(), record.original_dst.port),
        }
    }
}

/// A program's link, held for what dropping it does: an owned link detaches its program; a pinned one
/// (made by this agent, or a previous agent's that now runs this agent's program) stays attached for
/// the next agent.
#[derive(Debug)]
enum AgentLink {
    Owned { _link: FdLink },
    Pinned { _link: PinnedLink },
    Updated { _link: OwnedFd },
}

/// The loaded and attached programs. Dropping it detaches every program, unless they are pinned.
pub struct Interceptor {
    // Declared first so the links are dropped (and the programs detached) before anything else, in
    // the order [`attach_all`] gives them.
    links: Vec<AgentLink>,
    connects_by_tuple: TupleMap,
    /// Keyed by the raw socket cookie, as the programs key it.
    connects_by_cookie: HashMap<MapData, u64, ConnectRecord>,
    counters: PerCpuArray<MapData, u64>,
    /// `OVER_LIMIT_CGROUPS`, set and cleared through a shared reference ([`sys`]). Held for the life
    /// of the programs that read it.
    over_limit: MapData,
    /// `MODE`, written through a shared reference ([`sys`]): every connect program of this load
    /// reads it.
    mode: MapData,
    log_forwarder: JoinHandle<()>,
    cgroup_root: PathBuf,
    _ebpf: Ebpf,
}

impl Interceptor {
    /// Loads the embedded object, fills its configuration maps and attaches every program to
    /// `config.cgroup_root`. Must run inside a tokio runtime.
    pub fn attach(config: &RedirectConfig) -> Result<Self, BpfError> {
        if !object_embedded() {
            return Err(BpfError::NotEmbedded);
        }
        tokio::runtime::Handle::try_current().map_err(|_| BpfError::NoRuntime)?;
        let cgroup = File::open(&config.cgroup_root).map_err(|source| BpfError::CgroupRoot {
            path: config.cgroup_root.clone(),
            source,
        })?;

        let pin_dir = config.pin_dir.as_deref().map(PinDir::create).transpose()?;
        let mut ebpf = load(config, pin_dir.as_ref())?;
        let logger = EbpfLogger::init(&mut ebpf).map_err(|err| BpfError::Logger(io::Error::other(err)))?;
        let log_forwarder = spawn_log_forwarder(logger).map_err(BpfError::Logger)?;

        fill_set(
            &mut ebpf,
            names::INTERCEPTED,
            config.intercepted.iter().copied().map(endpoint),
        )?;
        fill_set(
            &mut ebpf,
            names::INTERCEPTED_ADDRS,
            config.intercepted.iter().map(|addr| InetAddr::from_ip(addr.ip())),
        )?;
        fill_set(
            &mut ebpf,
            names::EXEMPT_CGROUPS,
            config.exempt_cgroups.iter().map(|id| id.0),
        )?;
        // The ports a previous agent's programs still redirect to stay guarded until they are replaced.
        add_to_set(&mut ebpf, names::GUARDED_PORTS, &config.guarded_ports)?;
        let connects_by_tuple = TupleMap::take(&mut ebpf)?;
        let connects_by_cookie = take_map(&mut ebpf, names::CONNECTS_BY_COOKIE)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let over_limit = take_map_data(&mut ebpf, names::OVER_LIMIT_CGROUPS)?;
        let mode = take_map_data(&mut ebpf, names::MODE)?;
        write_mode(&mode, config.mode)?;
        if pin_dir.is_some() {
            // Records a previous agent never consumed describe connections nobody will accept now;
            // fresh ones may be of connections waiting in this agent's listen queue.
            let flushed = connects_by_tuple.flush_stale()?;
            tracing::info!(flushed, "took over the pinned connection records");
        }
        let cgroup_id = cgroup_id_of(&cgroup, &config.cgroup_root)?;
        let links = attach_all(&mut ebpf, &cgroup, cgroup_id, pin_dir.as_ref(), config.mode)?;
        fill_set(
            &mut ebpf,
            names::GUARDED_PORTS,
            config.guarded_ports.iter().copied(),
        )?;
        if let Some(dir) = &pin_dir {
            // Only now that this layout's programs run may an older layout's stop.
            for removed in dir.remove_other_layouts()? {
                tracing::info!(layout = %removed.layout, links = removed.links, maps = removed.maps,
                    "removed the programs of an older pin layout");
            }
        }
        let updated = links
            .iter()
            .filter(|link| matches!(link, AgentLink::Updated { .. }))
            .count();
        tracing::info!(cgroup_root = %config.cgroup_root.display(), mode = ?config.mode, programs = links.len(),
            updated_in_place = updated, guarded_ports = ?config.guarded_ports,
            pinned_in = config.pin_dir.as_ref().map(|dir| dir.display().to_string()), "BPF programs attached");

        Ok(Self {
            links,
            connects_by_tuple,
            connects_by_cookie,
            counters,
            over_limit,
            mode,
            log_forwarder,
            cgroup_root: config.cgroup_root.clone(),
            _ebpf: ebpf,
        })
    }

    /// Switches every connect program of this load at once: from refusing metadata connects to
    /// redirecting them to the agent, or back.
    pub fn set_mode(&self, mode: Mode) -> Result<(), BpfError> {
        write_mode(&self.mode, mode)
    }

    /// Refuses in the kernel (`true`), or allows again, the connects of `cgroup_id` to the intercepted
    /// endpoints: while its pod holds all the connections it may, each further connect fails at once
    /// (EPERM) instead of costing the agent an accept and a close.
    pub fn set_over_limit(&self, cgroup_id: CgroupId, over: bool) -> io::Result<()> {
        if over {
            sys::update(self.over_limit.fd().as_fd(), &cgroup_id.0, &1u8)
        } else {
            sys::delete(self.over_limit.fd().as_fd(), &cgroup_id.0).map(drop)
        }
    }

    /// The cgroup that made the accepted connection `peer -> local`, consuming the kernel's record of
    /// it. `None` when the connection was not redirected by the programs, or its record is too old to
    /// be this connection's: such a caller must be refused.
    pub fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution> {
        let key = ConnectionKey {
            client: endpoint(peer),
            server: endpoint(local),
        };
        let record = match self.connects_by_tuple.take_record(&key) {
            Ok(record) => record?,
            Err(err) => {
                tracing::warn!(%peer, %local, error = %err, "cannot look up connection attribution");
                return None;
            }
        };
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(record.created_ns));
        if age > MAX_RECORD_AGE {
            tracing::warn!(%peer, %local, cgroup_id = record.cgroup_id.0, age_ms = age.as_millis() as u64,
                "refusing a stale connection record");
            return None;
        }
        Some(record.into())
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, BpfError> {
        Counter::ALL
            .iter()
            .map(|&counter| Ok((counter, self.counter(counter)?)))
            .collect()
    }

    /// One of the programs' counters, summed over CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, BpfError> {
        let per_cpu = self
            .counters
            .get(&(counter as u32), 0)
            .map_err(|source| BpfError::Map {
                name: names::COUNTERS,
                source,
            })?;
        Ok(per_cpu.iter().sum())
    }
}

/// Loads the object with the agent's addresses, the configured map sizes, and the pinned maps of a
/// previous agent where there are any.
fn load(config: &RedirectConfig, pin_dir: Option<&PinDir>) -> Result<Ebpf, BpfError> {
    let agent_v4 = endpoint(SocketAddr::V4(config.agent_v4));
    let agent_v6 = config
        .agent_v6
        .map(|addr| endpoint(SocketAddr::V6(addr)))
        .unwrap_or_default();
    let map_pins: Vec<(&str, PathBuf)> = pin_dir
        .iter()
        .flat_map(|dir| pin::PINNED_MAPS.map(|name| (name, dir.map(name))))
        .collect();
    let node_netns_cookie = config.node_netns_cookie.unwrap_or(0);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::AGENT_V4, &agent_v4, true)
        .override_global(names::AGENT_V6, &agent_v6, true)
        .override_global(names::NODE_NETNS_COOKIE, &node_netns_cookie, true)
        .map_max_entries(names::CONNECTS_BY_COOKIE, config.connection_map_entries)
        .map_max_entries(names::CONNECTS_BY_TUPLE, config.connection_map_entries);
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(EMBEDDED_OBJECT).map_err(BpfError::Load)
}

/// [`ConnectionKey`] -> [`ConnectRecord`]. Records are taken with one syscall per accept, so no lock
/// stands between accepts, or between an accept and a metrics scrape.
struct TupleMap {
    records: HashMap<MapData, ConnectionKey, ConnectRecord>,
    /// The same map, for the syscalls aya does not offer (see [`sys`]).
    fd: OwnedFd,
    /// Set once the kernel has refused `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on hash maps (before 5.14).
    no_lookup_and_delete: AtomicBool,
}

impl TupleMap {
    fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let name = names::CONNECTS_BY_TUPLE;
        let map = ebpf.take_map(name).ok_or(BpfError::MissingMap { name })?;
        let (Map::HashMap(data) | Map::LruHashMap(data)) = &map else {
            return Err(BpfError::WrongMapType { name });
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| BpfError::Syscall { name, source })?;
        let records = HashMap::try_from(map).map_err(|source| BpfError::Map { name, source })?;
        Ok(Self {
            records,
            fd,
            no_lookup_and_delete: AtomicBool::new(false),
        })
    }

    /// Takes the record of `key` out of the map, atomically where the kernel can.
    fn take_record(&self, key: &ConnectionKey) -> io::Result<Option<ConnectRecord>> {
        if !self.no_lookup_and_delete.load(Ordering::Relaxed) {
            match sys::lookup_and_delete(self.fd.as_fd(), key) {
                Err(err) if sys::is_unsupported(&err) => {
                    tracing::info!(
                        "this kernel has no lookup-and-delete for hash maps; using lookup, then delete"
                    );
                    self.no_lookup_and_delete.store(true, Ordering::Relaxed);
                }
                result => return result,
            }
        }
        // Lookup, then delete: only the caller whose delete succeeds owns the record.
        let record = match self.records.get(key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(err) => return Err(io::Error::other(err)),
        };
        Ok(sys::delete(self.fd.as_fd(), key)?.then_some(record))
    }

    /// Deletes every record older than [`MAX_RECORD_AGE`], which no accept would take; how many there
    /// were.
    fn flush_stale(&self) -> Result<usize, BpfError> {
        let now = monotonic_ns();
        let keys: Vec<ConnectionKey> = self
            .records
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, record)| {
                Duration::from_nanos(now.saturating_sub(record.created_ns)) > MAX_RECORD_AGE
            })
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            sys::delete(self.fd.as_fd(), key).map_err(|source| BpfError::Syscall {
                name: names::CONNECTS_BY_TUPLE,
                source,
            })?;
        }
        Ok(keys.len())
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// How many records the connection maps hold: connects of sockets still open, and 4-tuple records not
/// yet consumed by an accept. Both are LRU maps of fixed size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub connects_by_cookie: u64,
    pub connects_by_tuple: u64,
}

impl Interceptor {
    /// Counts the maps' entries (one key walk each; meant for a metrics scrape, not the request path).
    /// It takes no lock: accepts go on while it walks.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            connects_by_cookie: self.connects_by_cookie.keys().count() as u64,
            connects_by_tuple: self.connects_by_tuple.records.keys().count() as u64,
        }
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.log_forwarder.abort();
        let pinned = self
            .links
            .iter()
            .filter(|link| !matches!(link, AgentLink::Owned { .. }))
            .count();
        let detached = self.links.len() - pinned;
        self.links.clear();
        tracing::info!(cgroup_root = %self.cgroup_root.display(), detached, left_pinned = pinned, "BPF programs released");
    }
}

/// A dual-stack listener sees IPv4 callers as IPv4-mapped IPv6; `InetAddr` holds both forms alike.
fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::new(InetAddr::from_ip(addr.ip()), addr.port())
}

/// Makes the set map `name` hold exactly `keys`. A pinned set may hold a previous agent's entries, which
/// running programs read: the new keys go in first and the stale ones come out after, so no moment has
/// the set missing an entry both agents want.
fn fill_set<K: aya::Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = K>,
) -> Result<(), BpfError> {
    let keys: Vec<K> = keys.collect();
    add_to_set(ebpf, name, &keys)?;
    let map = ebpf.map_mut(name).ok_or(BpfError::MissingMap { name })?;
    let mut set = HashMap::<_, K, u8>::try_from(map).map_err(|source| BpfError::Map { name, source })?;
    let stale: Vec<K> = set
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !keys.contains(key))
        .collect();
    for key in stale {
        set.remove(&key)
            .map_err(|source| BpfError::Map { name, source })?;
    }
    Ok(())
}

/// The map `name` as data, for the syscalls of [`sys`].
fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, BpfError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(data) | Map::Array(data)) => Ok(data),
        Some(_) => Err(BpfError::WrongMapType { name }),
        None => Err(BpfError::MissingMap { name }),
    }
}

fn write_mode(map: &MapData, mode: Mode) -> Result<(), BpfError> {
    sys::update(map.fd().as_fd(), &0u32, &(mode as u32)).map_err(|source| BpfError::Syscall {
        name: names::MODE,
        source,
    })
}

/// Adds `keys` to the set map `name`, leaving what it holds.
fn add_to_set<K: aya::Pod>(ebpf: &mut Ebpf, name: &'static str, keys: &[K]) -> Result<(), BpfError> {
    let map = ebpf.map_mut(name).ok_or(BpfError::MissingMap { name })?;
    let mut set = HashMap::<_, K, u8>::try_from(map).map_err(|source| BpfError::Map { name, source })?;
    for key in keys {
        set.insert(key, 1, 0)
            .map_err(|source| BpfError::Map { name, source })?;
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap { name })?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Loads every program and puts it in place: into the link pinned for it on the same cgroup when there
/// is one (a previous agent's, whose program it replaces in one step), else in a new link (pinned when
/// `pin_dir` is set, in place of any pinned on another cgroup). The verifier takes the time, so every
/// program is loaded before the first goes in place: the programs then go in place back to back, in
/// [`attach_order`]. The links come back in the order they are to be released, [`PROGRAMS`]': the
/// connect programs last, so no connect leaves un-redirected while the egress program still drops what
/// it sends.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    cgroup_id: u64,
    pin_dir: Option<&PinDir>,
    mode: Mode,
) -> Result<Vec<AgentLink>, BpfError> {
    for name in PROGRAMS {
        cgroup_program(ebpf, name)?.load_once(name)?;
    }
    let mut links = attach_order(mode)
        .into_iter()
        .map(|name| put_in_place(cgroup_program(ebpf, name)?, name, cgroup, cgroup_id, pin_dir))
        .collect::<Result<Vec<_>, BpfError>>()?;
    if mode == Mode::Refuse {
        links.rotate_left(CONNECT_PROGRAMS.len());
    }
    Ok(links)
}

/// The order the programs go in place. Redirecting, the programs that read the connect records go
/// first and the connect programs that write them last, so no connect redirected by a new connect
/// program meets an old `sock_ops` that would not file it (a guard's, which knows no agent).
/// Refusing, the connect programs go first: they file nothing, and from that instant a new connect to
/// the metadata service fails at once, where one made just before them would leave un-redirected and
/// meet the egress program's drop, costing its client a whole timeout.
fn attach_order(mode: Mode) -> [&'static str; PROGRAMS.len()] {
    let mut order = PROGRAMS;
    if mode == Mode::Refuse {
        order.rotate_right(CONNECT_PROGRAMS.len());
    }
    order
}

/// `name`'s program, as the cgroup program of its type.
fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut dyn CgroupProgram, BpfError> {
    Ok(match name {
        SOCK_OPS_PROGRAM => program::<SockOps>(ebpf, name)?,
        EGRESS_PROGRAM => program::<CgroupSkb>(ebpf, name)?,
        _ => program::<CgroupSockAddr>(ebpf, name)?,
    })
}

fn put_in_place(
    program: &mut dyn CgroupProgram,
    name: &'static str,
    cgroup: &File,
    cgroup_id: u64,
    pin_dir: Option<&PinDir>,
) -> Result<AgentLink, BpfError> {
    let Some(dir) = pin_dir else {
        return Ok(AgentLink::Owned {
            _link: program.attach_to(name, cgroup)?,
        });
    };
    if let Some(link) = dir.link_to_update(name, cgroup_id)? {
        match sys::link_update(link.as_fd(), program.program_fd(name)?) {
            Ok(()) => return Ok(AgentLink::Updated { _link: link }),
            // The pinned link runs a program of another type (another version's): it is replaced
            // below instead, both attached for a moment.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(program = name, error = %err, "cannot swap the program into its pinned link; replacing the link");
            }
            Err(source) => {
                return Err(BpfError::PinLink {
                    path: dir.link(name),
                    source,
                });
            }
        }
    }
    let link = program.attach_to(name, cgroup)?;
    Ok(AgentLink::Pinned {
        _link: dir.replace_link(name, link)?,
    })
}

/// The id of the cgroup open as `cgroup` (`path`): its inode number.
fn cgroup_id_of(cgroup: &File, path: &std::path::Path) -> Result<u64, BpfError> {
    use std::os::unix::fs::MetadataExt;
    cgroup
        .metadata()
        .map(|meta| meta.ino())
        .map_err(|source| BpfError::CgroupRoot {
            path: path.to_owned(),
            source,
        })
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(BpfError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Load, then attach to a cgroup and take the link, or hand the program to a pinned link: the same
/// steps for each cgroup program type.
trait CgroupProgram {
    fn load_once(&mut self, name: &'static str) -> Result<(), BpfError>;
    fn program_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, BpfError>;
    fn attach_to(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, BpfError>;
}

/// Each program type, with the attach arguments it takes before the mode.
macro_rules! impl_cgroup_program {
    ($($program:ty => ($($attach_arg:expr),*)),+ $(,)?) => {$(
        impl CgroupProgram for $program {
            fn load_once(&mut self, name: &'static str) -> Result<(), BpfError> {
                self.load().map_err(|source| BpfError::Program { name, source })
            }

            fn program_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, BpfError> {
                self.fd()
                    .map(|fd| fd.as_fd())
                    .map_err(|source| BpfError::Program { name, source })
            }

            fn attach_to(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, BpfError> {
                let program_error = |source| BpfError::Program { name, source };
                // Single: aya passes the mode as bpf_link_create flags, where AllowMultiple is EINVAL;
                // cgroup links coexist with other programs on the same cgroup anyway.
                let link_id = self
                    .attach(cgroup, $($attach_arg,)* CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = self.take_link(link_id).map_err(program_error)?;
                FdLink::try_from(link).map_err(|source| BpfError::Link { name, source })
            }
        }
    )+};
}

impl_cgroup_program!(
    CgroupSockAddr => (),
    SockOps => (),
    CgroupSkb => (CgroupSkbAttachType::Egress),
);

/// Moves the logger into a task that drains its ring buffer whenever it becomes readable. The logger
/// owns the log map: dropping it would close the map and break the next program load.
fn spawn_log_forwarder(logger: EbpfLogger<&'static dyn log::Log>) -> io::Result<JoinHandle<()>> {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as long as the
    // logger lives, and the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|err| err.into_parts().1)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_goes_in_place_once_and_refusing_connects_go_first() {
        assert!(PROGRAMS.ends_with(&CONNECT_PROGRAMS), "released last");
        for mode in [Mode::Redirect, Mode::Refuse] {
            let mut order = attach_order(mode).to_vec();
            let connects_at = |order: &[&str]| order.iter().position(|name| name.starts_with("connect"));
            let first_connect = connects_at(&order);
            assert_eq!(first_connect, Some(if mode == Mode::Refuse { 0 } else { 6 }));
            order.sort_unstable();
            let mut every = PROGRAMS.to_vec();
            every.sort_unstable();
            assert_eq!(order, every, "{mode:?}");
        }
    }

    #[test]
    fn mapped_and_plain_ipv4_callers_key_alike() {
        let plain: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:40000".parse().unwrap();
        assert_eq!(endpoint(plain), endpoint(mapped));
    }

    #[test]
    fn metadata_endpoints_are_ec2s() {
        assert_eq!(METADATA_V4.to_string(), "169.254.169.254:80");
        assert_eq!(METADATA_V6.to_string(), "[fd00:ec2::254]:80");
    }
}
