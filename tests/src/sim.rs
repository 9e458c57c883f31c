//! The simulated node and its pods.
//!
//! The node is a network namespace whose `lo` holds 169.254.169.254/32 and fd00:ec2::254/128 (where a
//! test puts its stand-in metadata service) and the node's own addresses (where the agent listens).
//! Each pod network is a namespace joined to the node by a veth pair, with a default route via the node;
//! the node's end is named as Calico names it (`cali<n>`), which kube2iam's DNAT rule matches. A
//! hostNetwork pod has no network of its own: its processes run in the node's namespace. Cgroups
//! follow the kubelet's systemd layout under a unique tree:
//! `<tree>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use interceptor::bpf::RedirectConfig;

use crate::{bpffs::BpffsMount, cgroup::CgroupTree, netns::NetNs, unique_name};

/// The node's own addresses, where the agent listens.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
pub const AGENT_PORT: u16 = 8181;
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The prefix of the node's end of each pod's veth pair: Calico's, so `-i cali+` matches pods' traffic.
pub const POD_INTERFACE_PREFIX: &str = "cali";
pub const METADATA_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

pub struct SimNode {
    // First, so pinned programs are removed before the cgroups and namespaces they were attached to.
    bpffs: BpffsMount,
    netns: NetNs,
    cgroups: CgroupTree,
    kubepods: PathBuf,
    pods_created: u8,
}

impl SimNode {
    pub fn new() -> Result<Self> {
        let name = unique_name("icn");
        let netns = NetNs::create(&name)?;
        for addr in [format!("{METADATA_IP}/32"), format!("{NODE_IP}/32")] {
            netns.ip(&["addr", "add", &addr, "dev", "lo"])?;
        }
        // nodad: an IPv6 address is tentative until the kernel's address work runs, even on lo, and
        // a bind to it fails (EADDRNOTAVAIL) until then; on a loaded machine that can be a while.
        for addr in [format!("{METADATA_IP6}/128"), format!("{NODE_IP6}/128")] {
            netns.ip(&["addr", "add", &addr, "dev", "lo", "nodad"])?;
        }
        let cgroups = CgroupTree::create(&name)?;
        let kubepods = cgroups.mkdir("kubepods.slice/kubepods-besteffort.slice")?;
        Ok(Self {
            bpffs: BpffsMount::new()?,
            netns,
            kubepods: kubepods.parent().expect("kubepods.slice").to_path_buf(),
            cgroups,
            pods_created: 0,
        })
    }

    pub fn agent_v4(&self) -> SocketAddrV4 {
        SocketAddrV4::new(NODE_IP, AGENT_PORT)
    }

    pub fn agent_v6(&self) -> SocketAddrV6 {
        SocketAddrV6::new(NODE_IP6, AGENT_PORT, 0, 0)
    }

    /// What a reboot does to the agent's programs: bpffs comes back empty, so nothing is pinned and
    /// nothing attached (once no process holds a link). Cgroups and networks stay, as a kubelet
    /// re-creates them.
    pub fn reboot(&self) -> Result<()> {
        self.bpffs.reboot()
    }

    /// The node's bpffs directory for the agent's pins (`--bpffs-dir`).
    pub fn bpffs_dir(&self) -> std::path::PathBuf {
        self.bpffs.agent_dir()
    }

    /// The workload cgroup root the programs attach to (`kubepods.slice`).
    pub fn kubepods(&self) -> &Path {
        &self.kubepods
    }

    /// Creates a cgroup anywhere in the node's tree (outside `kubepods.slice` for "not a workload").
    pub fn cgroup(&self, relative: &str) -> Result<PathBuf> {
        self.cgroups.mkdir(relative)
    }

    /// Redirects to the agent's IPv4 and IPv6 addresses, attached at `kubepods.slice`.
    pub fn redirect_config(&self) -> RedirectConfig {
        let mut config = RedirectConfig::new(self.kubepods.clone(), self.agent_v4());
        config.agent_v6 = Some(self.agent_v6());
        config
    }

    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.netns
            .run(move || TcpListener::bind(addr))
            .with_context(|| format!("bind {addr}"))
    }

    /// A raw TCP socket in the node's namespace: it receives a copy of every IPv4 TCP segment that
    /// arrives for the node, whether a listener takes it or not.
    pub fn tcp_capture(&self) -> Result<TcpCapture> {
        let fd = self.netns.run(|| {
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is a new socket nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        Ok(TcpCapture {
            socket: std::net::UdpSocket::from(fd),
        })
    }

    pub fn bind_udp(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.netns
            .run(move || UdpSocket::bind(addr))
            .with_context(|| format!("bind udp {addr}"))
    }

    /// Waits (bounded) until something in the node accepts TCP connections at `addr`.
    pub fn wait_for_listener(&self, addr: SocketAddr) -> Result<()> {
        self.netns
            .run(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                        Ok(_) => return Ok(()),
                        Err(err) if Instant::now() >= deadline => return Err(err),
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .with_context(|| format!("nothing listens on {addr} in the node"))
    }

    /// A new pod with a network of its own.
    pub fn pod(&mut self) -> Result<Pod> {
        self.pods_created += 1;
        let network = PodNetwork::create(self, self.pods_created)?;
        self.pod_in(&Arc::new(network), random_pod_uid())
    }

    /// A new pod in an existing pod's network: what hostNetwork pods look like (one IP, many pods).
    pub fn pod_sharing(&mut self, other: &Pod) -> Result<Pod> {
        self.pod_in(&other.network, random_pod_uid())
    }

    /// A static pod (from a manifest on the node), with a network of its own: the kubelet names its
    /// cgroup after the 32 hex digits of its config hash, which its mirror pod carries in the
    /// `kubernetes.io/config.mirror` annotation.
    pub fn static_pod(&mut self) -> Result<Pod> {
        self.pods_created += 1;
        let network = PodNetwork::create(self, self.pods_created)?;
        let hash = format!("{:016x}{:016x}", random_u64(), random_u64());
        self.pod_in(&Arc::new(network), hash)
    }

    /// A hostNetwork pod (`spec.hostNetwork: true`): its cgroups as the kubelet names them, its
    /// processes in the node's own network namespace ([`SimNode::command`]).
    pub fn host_network_pod(&mut self) -> Result<HostNetworkPod> {
        let uid = random_pod_uid();
        Ok(HostNetworkPod {
            slice: self.pod_slice(&uid)?,
            uid,
        })
    }

    fn pod_in(&mut self, network: &Arc<PodNetwork>, uid: String) -> Result<Pod> {
        Ok(Pod {
            network: network.clone(),
            slice: self.pod_slice(&uid)?,
            uid,
        })
    }

    /// Creates the pod-level cgroup of the pod `uid`.
    fn pod_slice(&self, uid: &str) -> Result<PathBuf> {
        let slice = self.kubepods.join(format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir(&slice).with_context(|| format!("cannot create {}", slice.display()))?;
        Ok(slice)
    }

    /// A command in the node's network namespace and the given cgroup.
    pub fn command(&self, cgroup_dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.netns.command(cgroup_dir, program)
    }
}

/// What [`SimNode::tcp_capture`] returns.
pub struct TcpCapture {
    // A raw socket read through UdpSocket's datagram calls (recv and its timeout), which are the same.
    socket: std::net::UdpSocket,
}

impl TcpCapture {
    /// Reads segments until one from source port `until_port` arrives (bounded), and returns how many
    /// from source port `counted_port` came before it. Segments of one path arrive in the order they
    /// were sent, so a marker sent after a packet proves the packet had its chance to arrive.
    pub fn count_before(&self, counted_port: u16, until_port: u16) -> Result<usize> {
        self.socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut counted = 0;
        let mut packet = [0u8; 2048];
        while Instant::now() < deadline {
            let Ok(len) = self.socket.recv(&mut packet) else {
                continue;
            };
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            if len < header_len + 4 {
                continue;
            }
            let source_port = u16::from_be_bytes([packet[header_len], packet[header_len + 1]]);
            if source_port == until_port {
                return Ok(counted);
            }
            counted += usize::from(source_port == counted_port);
        }
        anyhow::bail!("no segment from port {until_port} reached the node")
    }
}

/// A pod network: namespace, veth to the node, IPv4 and IPv6 addresses.
pub struct PodNetwork {
    netns: NetNs,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl PodNetwork {
    fn create(node: &SimNode, index: u8) -> Result<Self> {
        let netns = NetNs::create(&unique_name("icp"))?;
        let veth = format!("{POD_INTERFACE_PREFIX}{index}");
        let (node_ip, ip) = (Ipv4Addr::new(10, 99, index, 1), Ipv4Addr::new(10, 99, index, 2));
        let node_ip6 = Ipv6Addr::new(0xfd00, 0x99, u16::from(index), 0, 0, 0, 0, 1);
        let ip6 = Ipv6Addr::new(0xfd00, 0x99, u16::from(index), 0, 0, 0, 0, 2);
        node.netns.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        node.netns
            .ip(&["addr", "add", &format!("{node_ip}/24"), "dev", &veth])?;
        node.netns
            .ip(&["addr", "add", &format!("{node_ip6}/64"), "dev", &veth, "nodad"])?;
        node.netns.ip(&["link", "set", &veth, "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &node_ip.to_string()])?;
        netns.ip(&["-6", "route", "add", "default", "via", &node_ip6.to_string()])?;
        Ok(Self { netns, ip, ip6 })
    }
}

pub struct Pod {
    network: Arc<PodNetwork>,
    pub uid: String,
    slice: PathBuf,
}

impl Pod {
    pub fn network(&self) -> &PodNetwork {
        &self.network
    }

    /// The pod-level cgroup (`...kubepods-besteffort-pod<uid>.slice`).
    pub fn slice(&self) -> &Path {
        &self.slice
    }

    /// Creates a container cgroup as containerd names it under the systemd driver.
    pub fn container(&self) -> Result<PathBuf> {
        container_in(&self.slice)
    }

    /// Removes the pod's cgroups, as the kubelet does once the pod is gone (a process still in one is
    /// killed first). Its network goes with the last pod sharing it.
    pub fn remove(self) -> Result<()> {
        crate::cgroup::remove_tree(&self.slice)
            .with_context(|| format!("cannot remove {}", self.slice.display()))
    }

    /// A command in this pod's network namespace and the given cgroup (a container's, or any other).
    pub fn command(&self, cgroup_dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        self.network.netns.command(cgroup_dir, program)
    }
}

/// A hostNetwork pod: its cgroups, on the node's network ([`SimNode::host_network_pod`]).
pub struct HostNetworkPod {
    pub uid: String,
    slice: PathBuf,
}

impl HostNetworkPod {
    /// Creates a container cgroup as containerd names it under the systemd driver; run the
    /// container's processes with [`SimNode::command`].
    pub fn container(&self) -> Result<PathBuf> {
        container_in(&self.slice)
    }
}

/// Creates a container cgroup in the pod-level cgroup `slice`, as containerd names it.
fn container_in(slice: &Path) -> Result<PathBuf> {
    let id = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        random_u64(),
        random_u64(),
        random_u64(),
        random_u64()
    );
    let dir = slice.join(format!("cri-containerd-{id}.scope"));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// A pod UID in the form the API server gives one (a v4 UUID).
pub fn random_pod_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}
