//! bpf::pin: the agent's objects in bpffs, so the programs outlive the agent. While an agent restarts,
//! pods' connections to the metadata address still go to the agent's address (and are refused there),
//! never to the node's metadata service. The next agent reuses the pinned maps, attaches its programs,
//! then replaces the pinned links; `interceptor uninstall` removes everything.
//!
//! Layout: `<bpffs dir>/<layout>/maps/<MAP>` and `<bpffs dir>/<layout>/links/<program>`, where the layout
//! version changes whenever a pinned map's key or value does, so no agent reuses maps it cannot read.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use interceptor_common::names;

use super::BpfError;

/// The layout of the pinned maps; bump it with any change to their keys or values.
const LAYOUT: &str = "v1";

/// The maps a new agent takes over from the one before: the connection records (so connections made
/// during the handover are attributed) and the sets the old programs read until they are replaced.
pub const PINNED_MAPS: [&str; 4] = [
    names::CONNECTS_BY_COOKIE,
    names::CONNECTS_BY_TUPLE,
    names::INTERCEPTED,
    names::EXEMPT_CGROUPS,
];

/// `statfs(2)` magic of bpffs.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// The agent's directory in bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// `dir` must be on a bpffs mount; the layout's directories are created.
    pub fn create(dir: &Path) -> Result<Self, BpfError> {
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

    fn at(dir: &Path) -> Self {
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

    fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
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

fn is_bpffs(path: &Path) -> Result<bool, BpfError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| BpfError::NotBpffs {
        path: path.to_owned(),
    })?;
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

/// What `uninstall` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every pinned program and removes the pinned maps and the directory, whatever layout version
/// made them. Nothing there is not an error.
pub fn uninstall(dir: &Path) -> Result<Removed, BpfError> {
    let mut removed = Removed::default();
    let layouts = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(BpfError::PinDir {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for layout in layouts.flatten() {
        let pin_dir = PinDir { root: layout.path() };
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
        for sub in [pin_dir.links_dir(), pin_dir.maps_dir(), pin_dir.root] {
            remove_dir_if_present(&sub)?;
        }
    }
    remove_dir_if_present(dir)?;
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
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uninstalling_nothing_is_fine() {
        let dir = std::env::temp_dir().join(format!("interceptor-nothing-pinned-{}", std::process::id()));
        assert_eq!(uninstall(&dir).unwrap(), Removed::default());
    }
}
