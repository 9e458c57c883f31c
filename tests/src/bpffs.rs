//! A private bpffs instance for one simulated node: the agent pins its programs and maps there. Each
//! mount of bpffs is a filesystem of its own, so parallel tests never see each other's pins. On drop,
//! whatever is pinned is uninstalled (the programs detached), then the mount goes.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

pub struct BpffsMount {
    dir: tempfile::TempDir,
}

impl BpffsMount {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("interceptor-bpffs").tempdir()?;
        mount(dir.path())?;
        Ok(Self { dir })
    }

    /// What a reboot leaves: a new, empty bpffs in place of this one. The old mount goes with its pins,
    /// and with them the programs, once no process holds their links.
    pub fn reboot(&self) -> Result<()> {
        unmount(self.path())?;
        mount(self.path())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's directory in this mount (its `--bpffs-dir`).
    pub fn agent_dir(&self) -> PathBuf {
        self.path().join("interceptor")
    }
}

fn mount(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings that outlive the call; no mount data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot mount bpffs on {}", dir.display()));
    }
    Ok(())
}

fn unmount(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("cannot unmount {}", dir.display()));
    }
    Ok(())
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if let Err(err) = interceptor::bpf::pin::uninstall(&self.agent_dir()) {
            eprintln!(
                "warning: cannot uninstall what was pinned in {}: {:#}",
                self.path().display(),
                anyhow::Error::from(err)
            );
        }
        if let Err(err) = unmount(self.path()) {
            eprintln!("warning: {err:#}");
        }
    }
}
