//! bpf::inspect: what the kernel says is in place, for `interceptor status`: the programs attached to a
//! cgroup at the attach points the agent uses, and the links and maps pinned under the agent's bpffs
//! directory with how full each map is. Only reads; needs neither a running agent nor the BPF object.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{maps::MapInfo, programs::links::FdLink, programs::links::PinnedLink};
use aya_obj::generated::bpf_attach_type;
use serde::{Deserialize, Serialize};

use super::{BpfError, pin, sys};

/// The cgroup attach points the agent's programs use, named as `bpftool cgroup show` names them.
pub const ATTACH_POINTS: [(bpf_attach_type, &str); 8] = [
    (bpf_attach_type::BPF_CGROUP_INET4_CONNECT, "connect4"),
    (bpf_attach_type::BPF_CGROUP_INET6_CONNECT, "connect6"),
    (bpf_attach_type::BPF_CGROUP_INET4_BIND, "bind4"),
    (bpf_attach_type::BPF_CGROUP_INET6_BIND, "bind6"),
    (bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME, "getpeername4"),
    (bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME, "getpeername6"),
    (bpf_attach_type::BPF_CGROUP_SOCK_OPS, "sock_ops"),
    (bpf_attach_type::BPF_CGROUP_INET_EGRESS, "egress"),
];

/// A program the kernel reports attached to the cgroup itself, whoever attached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    /// One of [`ATTACH_POINTS`]' names.
    pub attach_type: String,
    pub program_id: u32,
    /// The program's name as loaded (at most 15 characters); empty when it was unloaded meanwhile.
    pub name: String,
}

/// Every program attached to `cgroup` itself at the agent's attach points, in [`ATTACH_POINTS`] order.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<AttachedProgram>, BpfError> {
    let dir = File::open(cgroup).map_err(|source| BpfError::CgroupRoot {
        path: cgroup.to_owned(),
        source,
    })?;
    let mut attached = Vec::new();
    for (attach_type, name) in ATTACH_POINTS {
        let ids = sys::attached_programs(dir.as_fd(), attach_type).map_err(|source| BpfError::Query {
            attach_type: name,
            path: cgroup.to_owned(),
            source,
        })?;
        attached.extend(ids.into_iter().map(|program_id| AttachedProgram {
            attach_type: name.to_owned(),
            program_id,
            name: String::new(),
        }));
    }
    let names = program_names();
    for program in &mut attached {
        program.name = names.get(&program.program_id).cloned().unwrap_or_default();
    }
    Ok(attached)
}

/// The names of the programs loaded on the host, by id (aya 0.14 has no lookup of one program by id).
fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        // A program unloaded during the walk is an error here, and no longer attached anyway.
        .filter_map(Result::ok)
        .map(|info| (info.id(), info.name_as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// What is pinned under the agent's bpffs directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    pub links: Vec<PinnedLinkInfo>,
    pub maps: Vec<PinnedMapInfo>,
    /// Pinned objects the kernel would not describe, each with why.
    pub unreadable: Vec<UnreadablePin>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedLinkInfo {
    pub path: PathBuf,
    pub link_id: u32,
    /// The program the link keeps attached.
    pub program_id: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedMapInfo {
    pub path: PathBuf,
    pub name: String,
    pub map_id: u32,
    /// Keys the map holds now.
    pub entries: u32,
    pub max_entries: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadablePin {
    pub path: PathBuf,
    pub error: String,
}

/// The links and maps pinned under `dir` (any layout version), each map with its occupancy. An empty
/// answer when nothing is pinned; an error only when the directory cannot be read.
pub fn pins(dir: &Path) -> Result<Pins, BpfError> {
    let paths = pin::pinned_paths(dir)?;
    let mut pins = Pins::default();
    for path in paths.links {
        match pinned_link(&path) {
            Ok(link) => pins.links.push(link),
            Err(err) => pins.unreadable.push(unreadable(path, &err)),
        }
    }
    for path in paths.maps {
        match pinned_map(&path) {
            Ok(map) => pins.maps.push(map),
            Err(err) => pins.unreadable.push(unreadable(path, &err)),
        }
    }
    Ok(pins)
}

fn unreadable(path: PathBuf, err: &(dyn std::error::Error + 'static)) -> UnreadablePin {
    UnreadablePin {
        path,
        error: crate::error_chain(err),
    }
}

fn pinned_link(path: &Path) -> Result<PinnedLinkInfo, aya::programs::links::LinkError> {
    // Opening a pin and dropping the fd leaves the pin, and the program, in place.
    let link = FdLink::from(PinnedLink::from_pin(path)?);
    let info = link.info()?;
    Ok(PinnedLinkInfo {
        path: path.to_owned(),
        link_id: info.id(),
        program_id: info.program_id(),
    })
}

fn pinned_map(path: &Path) -> Result<PinnedMapInfo, MapReadError> {
    let info = MapInfo::from_pin(path)?;
    let fd = info.fd()?;
    let entries = sys::count_keys(fd.as_fd(), info.key_size() as usize, info.max_entries())?;
    Ok(PinnedMapInfo {
        path: path.to_owned(),
        name: info.name_as_str().unwrap_or_default().to_owned(),
        map_id: info.id(),
        entries,
        max_entries: info.max_entries(),
    })
}

#[derive(Debug, thiserror::Error)]
enum MapReadError {
    #[error("cannot open the pinned map")]
    Open(#[from] aya::maps::MapError),
    #[error("cannot count the map's entries")]
    Count(#[from] io::Error),
}
