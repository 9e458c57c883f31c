//! Cgroup v2 directories that remove themselves: every process in them is killed, then the directory
//! and everything below it is removed, deepest first.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use interceptor_common::CgroupId;

/// A cgroup directory created by a test, with all of its subdirectories.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    /// Creates `name` directly under the cgroup2 mount.
    pub fn create(name: &str) -> Result<Self> {
        let mount = interceptor::identity::cgroup2_mount()?;
        let root = mount.join(name);
        fs::create_dir(&root).with_context(|| format!("cannot create cgroup {}", root.display()))?;
        Ok(Self { root })
    }

    /// Creates `relative` (and its parents) under this tree and returns its path.
    pub fn mkdir(&self, relative: &str) -> Result<PathBuf> {
        let dir = self.root.join(relative);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        Ok(dir)
    }
}

/// The kernel's id of a cgroup directory.
pub fn id_of(dir: &Path) -> CgroupId {
    interceptor::identity::cgroup_id(dir).expect("cgroup directory exists")
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.root) {
            eprintln!("warning: cannot remove cgroup {}: {err}", self.root.display());
        }
    }
}

/// Removes `dir` and every cgroup below it, deepest first, killing the processes left in each.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    kill_members(dir);
    fs::remove_dir(dir)
}

/// Kills every process left in `dir` and waits until the cgroup is empty, so it can be removed.
fn kill_members(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        return;
    }
    // cgroup.kill is asynchronous: the cgroup is empty once `populated 0` shows in cgroup.events.
    // Polled (bounded) because this runs in Drop, where nothing async is available.
    for _ in 0..2500 {
        let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|line| line == "populated 0") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
