//! Named network namespaces that delete themselves, and the two ways tests use them: creating sockets
//! inside one (on a short-lived thread that enters it), and starting processes inside one and inside a
//! given cgroup.

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, ensure};

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this namespace> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn open(&self) -> io::Result<File> {
        File::open(Path::new("/var/run/netns").join(&self.name))
    }

    /// Runs `f` on a thread inside this namespace; sockets it creates stay in the namespace wherever
    /// they are used afterwards. The calling thread never leaves the host's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> Result<T> {
        let ns = self
            .open()
            .with_context(|| format!("cannot open netns {}", self.name))?;
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on a namespace fd we own; it changes only this new thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        });
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("netns thread panicked"))?;
        result.with_context(|| format!("in netns {}", self.name))
    }

    /// A command that runs inside this namespace and inside the cgroup `cgroup_dir`. The child joins
    /// the cgroup, then the namespace, before it execs, so everything it starts is in both.
    pub fn command(&self, cgroup_dir: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
        command_in(&Path::new("/var/run/netns").join(&self.name), cgroup_dir, program)
    }
}

/// A command that runs inside the network namespace `netns` (a namespace file: a pinned one, or a
/// process's `/proc/PID/ns/net`) and inside the cgroup `cgroup_dir`. The child joins the cgroup, then
/// the namespace, before it execs, so everything it starts is in both.
pub fn command_in(netns: &Path, cgroup_dir: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
    let ns = File::open(netns).with_context(|| format!("cannot open netns {}", netns.display()))?;
    let procs_path = cgroup_dir.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("cannot open {}", procs_path.display()))?;
    let mut command = Command::new(program);
    // SAFETY: the closure only makes the async-signal-safe write(2) and setns(2) calls, on fds that
    // `ns` and `procs` keep open (they are moved into the closure, which lives as long as the
    // Command), as pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            // "0" means the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "delete", &self.name]) {
            eprintln!("warning: {err:#}");
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (package iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The network namespace `socket` lives in, as a descriptor setns(2) takes.
pub fn network_namespace_of(socket: &impl AsRawFd) -> Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor, or -1.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .context("SIOCGSKNS: cannot open the socket's network namespace");
    }
    // SAFETY: the descriptor is new and nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Moves the calling thread, and only it, into `netns`, and gives it a runtime of its own: every
/// socket the thread opens is then in that namespace (in-process servers of the node use this).
pub fn runtime_in(netns: &OwnedFd) -> io::Result<tokio::runtime::Runtime> {
    // SAFETY: setns on a namespace descriptor we own; it changes only the calling thread's namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}
