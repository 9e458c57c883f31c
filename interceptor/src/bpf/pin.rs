//! bpf::pin: the agent's objects in bpffs, so the programs outlive the agent. While an agent restarts,
//! pods' connections to the metadata address still go to the agent's address (and are refused there),
//! never to the node's metadata service. The next agent reuses the pinned maps, attaches its programs,
//! then replaces the pinned links; `interceptor uninstall` removes everything.
//!
//! Layout: `<bpffs dir>/<layout>/maps/<MAP>` and `<bpffs dir>/<layout>/links/<program>`, where the layout
//! version changes whenever a pinned map's key or value does, so no agent reuses maps it cannot read.
//! Within a layout the next agent swaps its programs into the pinned links in place
//! (`BPF_LINK_UPDATE`), so no connect ever meets neither program or both; an agent removes the other
//! layouts' programs once its own are attached. Every layout keeps `EXEMPT_CGROUPS` as cgroup id (u64)
//! -> u8, so a starting agent can exempt itself from whichever programs are running before it makes
//! any network call; entries of cgroups that are gone are pruned then, so starts that fail before
//! attaching cannot fill the set.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use interceptor_common::names;

use super::{BpfError, sys};

/// The layout of the pinned maps; bump it with any change to their keys or values.
/// v2: connect records carry their creation time; the intercepted addresses have a set of their own.
const LAYOUT: &str = "v2";

/// The maps a new agent takes over from the one before: the connection records (the cookie records
/// serve getpeername for connections still open), the sets the old programs read until they are
/// replaced, and the counters, so what programs refused while no agent ran (the guard's, a stopped
/// agent's) is counted by the next. A map added to this list within a layout is created by the first
/// agent that knows it; a version that adds a counter must bump the layout, as the pinned counters
/// keep the size they were made with.
pub const PINNED_MAPS: [&str; 7] = [
    names::CONNECTS_BY_COOKIE,
    names::CONNECTS_BY_TUPLE,
    names::INTERCEPTED,
    names::INTERCEPTED_ADDRS,
    names::EXEMPT_CGROUPS,
    names::GUARDED_PORTS,
    names::COUNTERS,
];

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
/// Where bpffs is mounted on a node; the agent mounts it there when it is missing.
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// The agent's directory in bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// `dir` must be on a bpffs mount (mounted at /sys/fs/bpf when it is missing there); the layout's
    /// directories are created.
    pub fn create(dir: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(dir)?;
        let pin_dir = Self::at(dir);
        for sub in [pin_dir.maps_dir(), pin_dir.links_dir()] {
            fs::create_dir_all(&sub).map_err(|source| BpfError::PinDir {
                path: sub.clone(),
                source,
            })?;
        }
        if !is_bpffs(&pin_dir.root)? {
            return Err(BpfError::NotBpffs { path: dir.to_owned() });
        }
        Ok(pin_dir)
    }

    /// Detaches the programs and removes the maps of every other layout under the same directory.
    pub fn remove_other_layouts(&self) -> Result<Vec<Removed>, BpfError> {
        let parent = self.root.parent().expect("a layout directory has a parent");
        let mut removed = Vec::new();
        for layout in entries(parent)? {
            if layout != self.root {
                removed.push(remove_layout(&PinDir { root: layout })?);
            }
        }
        Ok(removed)
    }

    /// This version's layout under `dir`, whether or not anything is pinned there.
    pub fn at(dir: &Path) -> Self {
        Self {
            root: dir.join(LAYOUT),
        }
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// The link pinned for `program`, open, when it is attached to the cgroup `cgroup_id`: the program
    /// of a new agent goes into it in place. `None` when there is none, or it is attached elsewhere (an
    /// agent started with another cgroup root), which [`PinDir::replace_link`] then replaces.
    pub fn link_to_update(&self, program: &'static str, cgroup_id: u64) -> Result<Option<OwnedFd>, BpfError> {
        let path = self.link(program);
        if !path.exists() {
            return Ok(None);
        }
        let pin_error = |source| BpfError::PinLink {
            path: path.clone(),
            source,
        };
        let link = sys::obj_get(&c_path(&path)?).map_err(pin_error)?;
        let attached_to = sys::link_cgroup_id(std::os::fd::AsFd::as_fd(&link)).map_err(pin_error)?;
        Ok((attached_to == cgroup_id).then_some(link))
    }

    /// Whether every one of `programs` has a link pinned in this layout, attached to the cgroup
    /// `cgroup_id`.
    pub fn holds_all(&self, programs: &[&'static str], cgroup_id: u64) -> Result<bool, BpfError> {
        for program in programs {
            if self.link_to_update(program, cgroup_id)?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Pins `new` (attached already) in place of the previous agent's link of the same program, which
    /// is detached. Both are attached for a moment, never neither.
    pub fn replace_link(&self, program: &'static str, new: FdLink) -> Result<PinnedLink, BpfError> {
        let path = self.link(program);
        let pin_error = |source: io::Error| BpfError::PinLink {
            path: path.clone(),
            source,
        };
        if path.exists() {
            let old = PinnedLink::from_pin(&path).map_err(|err| pin_error(io::Error::other(err)))?;
            // Unpinned and dropped: its last reference goes, and the old program is detached.
            drop(old.unpin().map_err(pin_error)?);
        }
        new.pin(&path).map_err(|err| pin_error(io::Error::other(err)))
    }
}

/// Mounts bpffs at /sys/fs/bpf when `dir` belongs there and nothing is mounted (as on hosts whose init
/// does not mount it); any other directory outside bpffs is an error that names the fix.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    let mount_point = Path::new(BPFFS_MOUNT_POINT);
    if !dir.starts_with(mount_point) || !mount_point.is_dir() || is_bpffs(mount_point)? {
        return Err(BpfError::NotBpffs { path: dir.to_owned() });
    }
    mount_bpffs(mount_point)?;
    tracing::warn!(
        mount_point = BPFFS_MOUNT_POINT,
        "bpffs was not mounted: mounted it, so the programs can be pinned (mount it at boot, or give the agent's pod a hostPath /sys/fs/bpf with Bidirectional propagation, so pins outlive the agent's mount namespace)"
    );
    Ok(())
}

fn mount_bpffs(mount_point: &Path) -> Result<(), BpfError> {
    let target = c_path(mount_point)?;
    // SAFETY: NUL-terminated strings that outlive the call; mode=0700 as data, as bpffs takes it.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(BpfError::PinDir {
            path: mount_point.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<CString, BpfError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| BpfError::NotBpffs {
        path: path.to_owned(),
    })
}

fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    let c_path = c_path(path)?;
    // SAFETY: statfs writes into the zeroed struct we pass, for a NUL-terminated path that outlives it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(BpfError::PinDir {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // f_type's width differs between architectures; the magic fits all of them.
    Ok(stat.f_type as u64 == BPF_FS_MAGIC)
}

/// What was removed of one layout.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub layout: String,
    pub links: usize,
    pub maps: usize,
}

/// Detaches every pinned program and removes the pinned maps and the directory, whatever layout version
/// made them. Nothing there is not an error.
pub fn uninstall(dir: &Path) -> Result<Vec<Removed>, BpfError> {
    let removed = entries(dir)?
        .into_iter()
        .map(|layout| remove_layout(&PinDir { root: layout }))
        .collect::<Result<Vec<_>, _>>()?;
    remove_dir_if_present(dir)?;
    Ok(removed)
}

/// What [`exempt_in_pinned`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exempted {
    /// Exempt sets written to (0 on a node with nothing pinned yet).
    pub sets: usize,
    /// Entries removed because their cgroup is gone (agents whose start failed before they attached).
    pub pruned: usize,
}

/// Exempts `cgroup_id` in the exempt set of every layout pinned under `dir`: the programs a previous
/// agent left running then let this agent reach the node's metadata service (and bind its ports) before
/// its own programs are attached. Entries of cgroups for which `is_gone` is true go first: an agent
/// container that failed before attaching left its entry behind, and the set has room for
/// [`sizes::EXEMPT_CGROUPS`](interceptor_common::sizes::EXEMPT_CGROUPS) only.
pub fn exempt_in_pinned(
    dir: &Path,
    cgroup_id: u64,
    is_gone: impl Fn(u64) -> bool,
) -> Result<Exempted, BpfError> {
    let name = names::EXEMPT_CGROUPS;
    let map_error = |source| BpfError::Map { name, source };
    let mut exempted = Exempted::default();
    for layout in entries(dir)? {
        let path = PinDir { root: layout }.map(name);
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(map_error)?;
        let mut set = HashMap::<_, u64, u8>::try_from(Map::HashMap(map)).map_err(map_error)?;
        let gone: Vec<u64> = set
            .keys()
            .filter_map(Result::ok)
            .filter(|&id| id != cgroup_id && is_gone(id))
            .collect();
        for id in gone {
            set.remove(&id).map_err(map_error)?;
            exempted.pruned += 1;
        }
        set.insert(cgroup_id, 1, 0).map_err(map_error)?;
        exempted.sets += 1;
    }
    Ok(exempted)
}

/// Adds `ports` to the guarded ports of this version's layout under `dir`, when it has them pinned: a
/// starting agent's ports are guarded from before it binds them, while the programs a previous agent
/// left keep guarding that agent's ports until this one's programs replace them.
pub fn guard_ports_in_pinned(dir: &Path, ports: &[u16]) -> Result<(), BpfError> {
    let name = names::GUARDED_PORTS;
    let path = PinDir::at(dir).map(name);
    if !path.exists() {
        return Ok(());
    }
    let map_error = |source| BpfError::Map { name, source };
    let map = MapData::from_pin(&path).map_err(map_error)?;
    let mut set = HashMap::<_, u16, u8>::try_from(Map::HashMap(map)).map_err(map_error)?;
    for port in ports {
        set.insert(port, 1, 0).map_err(map_error)?;
    }
    Ok(())
}

/// Whether any link is pinned under `dir`, whatever layout version made it.
pub fn any_links(dir: &Path) -> Result<bool, BpfError> {
    Ok(!pinned_paths(dir)?.links.is_empty())
}

/// The paths of the links and maps pinned under `dir`, whatever layout version made them (none when
/// nothing is pinned).
pub(super) fn pinned_paths(dir: &Path) -> Result<PinnedPaths, BpfError> {
    let mut paths = PinnedPaths::default();
    for layout in entries(dir)? {
        let layout = PinDir { root: layout };
        paths.links.extend(entries(&layout.links_dir())?);
        paths.maps.extend(entries(&layout.maps_dir())?);
    }
    paths.links.sort();
    paths.maps.sort();
    Ok(paths)
}

#[derive(Debug, Default)]
pub(super) struct PinnedPaths {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
}

fn remove_layout(pin_dir: &PinDir) -> Result<Removed, BpfError> {
    let mut removed = Removed {
        layout: pin_dir
            .root
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Removed::default()
    };
    for link in entries(&pin_dir.links_dir())? {
        let pinned = PinnedLink::from_pin(&link).map_err(|err| BpfError::PinLink {
            path: link.clone(),
            source: io::Error::other(err),
        })?;
        drop(
            pinned
                .unpin()
                .map_err(|source| BpfError::PinLink { path: link, source })?,
        );
        removed.links += 1;
    }
    for map in entries(&pin_dir.maps_dir())? {
        fs::remove_file(&map).map_err(|source| BpfError::PinDir { path: map, source })?;
        removed.maps += 1;
    }
    for sub in [pin_dir.links_dir(), pin_dir.maps_dir(), pin_dir.root.clone()] {
        remove_dir_if_present(&sub)?;
    }
    Ok(removed)
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|entry| entry.path()).collect()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(BpfError::PinDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<(), BpfError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::PinDir {
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_outside_bpffs_is_refused_with_a_hint() {
        let dir = std::env::temp_dir().join(format!("interceptor-not-bpffs-{}", std::process::id()));
        let err = PinDir::create(&dir).unwrap_err();
        assert!(matches!(err, BpfError::NotBpffs { .. }), "{err}");
        assert!(err.to_string().contains("mount -t bpf"));
        assert!(!dir.exists(), "nothing is created outside bpffs");
    }

    #[test]
    fn uninstalling_nothing_is_fine() {
        let dir = std::env::temp_dir().join(format!("interceptor-nothing-pinned-{}", std::process::id()));
        assert_eq!(uninstall(&dir).unwrap(), Vec::new());
        assert_eq!(exempt_in_pinned(&dir, 42, |_| true).unwrap(), Exempted::default());
        guard_ports_in_pinned(&dir, &[8181]).unwrap();
        assert!(!any_links(&dir).unwrap());
    }
}
