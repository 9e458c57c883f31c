//! bpf: the one module that touches aya. Loads the embedded BPF object, attaches its programs to the
//! workload cgroup root, owns their links (dropping the [`Interceptor`] detaches them), forwards the
//! programs' aya-log records to `tracing`, and answers "which cgroup made this accepted connection?".

pub mod metrics;
pub mod pin;

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use self::pin::PinDir;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, ProgramError, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use aya_log::EbpfLogger;
use interceptor_common::{
    CgroupId, ConnectRecord, ConnectionKey, Counter, Endpoint, InetAddr, NetnsCookie, SocketCookie, names,
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

/// The programs of the object, by function name, each attached to the cgroup root.
const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];
const SOCK_OPS_PROGRAM: &str = "file_connection";

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
    #[error("cannot open the cgroup root {path}")]
    CgroupRoot {
        path: PathBuf,
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
    /// Where redirected IPv4 connections (and IPv4-mapped ones of dual-stack sockets) go.
    pub agent_v4: SocketAddrV4,
    /// Where redirected native IPv6 connections go; without it they go to the IPv4-mapped `agent_v4`.
    pub agent_v6: Option<SocketAddrV6>,
    /// Destinations redirected to the agent.
    pub intercepted: Vec<SocketAddr>,
    /// Cgroups whose connections are never redirected: the agent's own.
    pub exempt_cgroups: Vec<CgroupId>,
    /// Where to pin the links and shared maps (a bpffs directory), so the programs outlive this
    /// process and the next agent takes over from them; `None`: they are detached on drop.
    pub pin_dir: Option<PathBuf>,
}

impl RedirectConfig {
    /// Intercepts EC2's metadata endpoints and exempts nothing.
    pub fn new(cgroup_root: PathBuf, agent_v4: SocketAddrV4) -> Self {
        Self {
            cgroup_root,
            agent_v4,
            agent_v6: None,
            intercepted: vec![METADATA_V4, METADATA_V6],
            exempt_cgroups: Vec::new(),
            pin_dir: None,
        }
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

/// A program's link, held for what dropping it does: an owned link detaches its program, a pinned one
/// leaves it attached for the next agent.
#[derive(Debug)]
enum AgentLink {
    Owned { _link: FdLink },
    Pinned { _link: PinnedLink },
}

/// The loaded and attached programs. Dropping it detaches every program, unless they are pinned.
pub struct Interceptor {
    // Declared first so the links are dropped (and the programs detached) before anything else.
    links: Vec<AgentLink>,
    connects_by_tuple: Mutex<HashMap<MapData, ConnectionKey, ConnectRecord>>,
    /// Keyed by the raw socket cookie, as the programs key it.
    connects_by_cookie: HashMap<MapData, u64, ConnectRecord>,
    counters: PerCpuArray<MapData, u64>,
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

        let agent_v4 = endpoint(SocketAddr::V4(config.agent_v4));
        let agent_v6 = config
            .agent_v6
            .map(|addr| endpoint(SocketAddr::V6(addr)))
            .unwrap_or_default();
        let pin_dir = config.pin_dir.as_deref().map(PinDir::create).transpose()?;
        let map_pins: Vec<(&str, PathBuf)> = pin_dir
            .iter()
            .flat_map(|dir| pin::PINNED_MAPS.map(|name| (name, dir.map(name))))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::AGENT_V4, &agent_v4, true)
            .override_global(names::AGENT_V6, &agent_v6, true);
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EMBEDDED_OBJECT).map_err(BpfError::Load)?;
        let logger = EbpfLogger::init(&mut ebpf).map_err(|err| BpfError::Logger(io::Error::other(err)))?;
        let log_forwarder = spawn_log_forwarder(logger).map_err(BpfError::Logger)?;

        fill_set(
            &mut ebpf,
            names::INTERCEPTED,
            config.intercepted.iter().copied().map(endpoint),
        )?;
        fill_set(
            &mut ebpf,
            names::EXEMPT_CGROUPS,
            config.exempt_cgroups.iter().map(|id| id.0),
        )?;
        let connects_by_tuple = take_map(&mut ebpf, names::CONNECTS_BY_TUPLE)?;
        let connects_by_cookie = take_map(&mut ebpf, names::CONNECTS_BY_COOKIE)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let links = attach_all(&mut ebpf, &cgroup)?
            .into_iter()
            .map(|(program, link)| match &pin_dir {
                Some(dir) => dir
                    .replace_link(program, link)
                    .map(|pinned| AgentLink::Pinned { _link: pinned }),
                None => Ok(AgentLink::Owned { _link: link }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(cgroup_root = %config.cgroup_root.display(), programs = links.len(),
            pinned_in = config.pin_dir.as_ref().map(|dir| dir.display().to_string()), "BPF programs attached");

        Ok(Self {
            links,
            connects_by_tuple: Mutex::new(connects_by_tuple),
            connects_by_cookie,
            counters,
            log_forwarder,
            cgroup_root: config.cgroup_root.clone(),
            _ebpf: ebpf,
        })
    }

    /// The cgroup that made the accepted connection `peer -> local`, consuming the kernel's record of
    /// it. `None` when the connection was not redirected by the programs (made straight to the agent,
    /// say): such a caller must be refused.
    pub fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution> {
        let key = ConnectionKey {
            client: endpoint(peer),
            server: endpoint(local),
        };
        let mut map = self
            .connects_by_tuple
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let record = match map.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return None,
            Err(err) => {
                tracing::warn!(%peer, %local, error = %err, "cannot look up connection attribution");
                return None;
            }
        };
        // A leftover record could attribute a later connection that reuses this 4-tuple: remove it now.
        if let Err(err) = map.remove(&key) {
            tracing::warn!(%peer, %local, error = %err, "cannot remove consumed connection attribution");
        }
        Some(record.into())
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, BpfError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self
                    .counters
                    .get(&(counter as u32), 0)
                    .map_err(|source| BpfError::Map {
                        name: names::COUNTERS,
                        source,
                    })?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// How many records the connection maps hold: connects not yet turned into 4-tuple records, and
/// 4-tuple records not yet consumed by an accept. Both are LRU maps of fixed size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub connects_by_cookie: u64,
    pub connects_by_tuple: u64,
}

impl Interceptor {
    /// Counts the maps' entries (one key walk each; meant for a metrics scrape, not the request path).
    pub fn occupancy(&self) -> Occupancy {
        let tuples = self
            .connects_by_tuple
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .count();
        Occupancy {
            connects_by_cookie: self.connects_by_cookie.keys().count() as u64,
            connects_by_tuple: tuples as u64,
        }
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.log_forwarder.abort();
        let pinned = self
            .links
            .iter()
            .filter(|link| matches!(link, AgentLink::Pinned { .. }))
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
    let map = ebpf.map_mut(name).ok_or(BpfError::MissingMap { name })?;
    let mut set = HashMap::<_, K, u8>::try_from(map).map_err(|source| BpfError::Map { name, source })?;
    let keys: Vec<K> = keys.collect();
    for key in &keys {
        set.insert(key, 1, 0)
            .map_err(|source| BpfError::Map { name, source })?;
    }
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

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap { name })?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn attach_all(ebpf: &mut Ebpf, cgroup: &File) -> Result<Vec<(&'static str, FdLink)>, BpfError> {
    let mut links = Vec::with_capacity(SOCK_ADDR_PROGRAMS.len() + 1);
    for name in SOCK_ADDR_PROGRAMS {
        links.push((
            name,
            program::<CgroupSockAddr>(ebpf, name)?.attach_to(name, cgroup)?,
        ));
    }
    let sock_ops = program::<SockOps>(ebpf, SOCK_OPS_PROGRAM)?.attach_to(SOCK_OPS_PROGRAM, cgroup)?;
    links.push((SOCK_OPS_PROGRAM, sock_ops));
    Ok(links)
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

/// Load, attach to a cgroup and take the link: the same steps for each cgroup program type.
trait CgroupProgram {
    fn attach_to(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, BpfError>;
}

macro_rules! impl_cgroup_program {
    ($($program:ty),+) => {$(
        impl CgroupProgram for $program {
            fn attach_to(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, BpfError> {
                let program_error = |source| BpfError::Program { name, source };
                self.load().map_err(program_error)?;
                // Single: aya passes the mode as bpf_link_create flags, where AllowMultiple is EINVAL;
                // cgroup links coexist with other programs on the same cgroup anyway.
                let link_id = self.attach(cgroup, CgroupAttachMode::Single).map_err(program_error)?;
                let link = self.take_link(link_id).map_err(program_error)?;
                FdLink::try_from(link).map_err(|source| BpfError::Link { name, source })
            }
        }
    )+};
}

impl_cgroup_program!(CgroupSockAddr, SockOps);

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
