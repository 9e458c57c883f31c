//! A containerd instance owned by one test: Debian's containerd 1.6 with its CRI plugin, runc (cgroupfs
//! driver) and bridge CNI networking, never the system's containerd.
//!
//! What it owns, all under one unique directory (`/tmp/itc-containerd-*`; under `/dev/shm` where `/tmp` is on overlayfs): its config, root (content
//! store, snapshots, metadata), state (task bundles, runc's root, CRI's network namespace pins), socket,
//! CNI config and IPAM state, and its log (containerd's stderr). It runs in the simulated node's network
//! namespace (so hostNetwork pods share the node's, and the CNI bridge and veths live there) and in a
//! cgroup of the node's tree (`system.slice/containerd-*.service`, v2 only), and in a mount namespace of
//! its own: there `/` is made rshared (host mounts are private here, and CRI refuses HostToContainer
//! propagation otherwise), and tmpfs on `/run/containerd` (shim sockets, which 1.6 puts there whatever
//! the config says) and `/var/lib/cni` (libcni's result cache) and a fresh bpffs on `/sys/fs/bpf` keep
//! what it writes there private. Every shim inherits that namespace, so its mounts (rootfs, tmpfs) go
//! when the last of them exits; nothing is mounted in the host's namespace. The only host trace is the
//! two empty mount points, created when missing.
//!
//! On drop: containerd gets SIGTERM (SIGKILL after a deadline), every process left in its mount
//! namespace (the shims) is killed, the cgroup of every task bundle in the state directory (its
//! `cgroupsPath`, in the cgroup2 mount, where what is left in it is killed, and in every v1
//! hierarchy) is removed, then the directory.
//! Pod-level cgroup parents belong to the caller, as they belong to the kubelet. Tests that make pods
//! through CRI should still stop and remove them first, as the kubelet would.

use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{sim::SimNode, unique_name};

/// The namespace CRI keeps its images and containers in: images a pod uses must be imported there.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pause image CRI runs for each sandbox; it never pulls one that is present, so import it under
/// exactly this name (`oci_archive::write_sleeper` makes one).
pub const PAUSE_IMAGE: &str = "localhost/interceptor-test/pause:1";
/// The pod network CNI's bridge hands out addresses from, inside the node's namespace. The simulated
/// node's own addresses are in 10.99.0.0/16 (`sim.rs`), so this cannot clash with them.
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The bridge's name in the node's namespace.
pub const BRIDGE: &str = "itc-cni0";
const RUNC: &str = "/usr/sbin/runc";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// How long containerd may take to answer on its socket, and to exit after SIGTERM.
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// The directory of task bundles under the state directory (the v2 runtime's).
const TASK_BUNDLES: &str = "io.containerd.runtime.v2.task";
const CONFIG: &str = "config.toml";
const LOG: &str = "containerd.log";

/// Writes the config and CNI network into `dir` and starts containerd in `node`'s network namespace,
/// a cgroup of the node's and a mount namespace of its own.
fn launch(node: &SimNode, dir: &Path, snapshotter: &'static str) -> Result<Child> {
    for sub in ["root", "state", "cni", "ipam"] {
        fs::create_dir(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    let config = dir.join(CONFIG);
    fs::write(&config, Containerd::config(dir, snapshotter))
        .with_context(|| format!("cannot write {}", config.display()))?;
    let conflist = dir.join("cni/10-interceptor-test.conflist");
    fs::write(&conflist, Containerd::cni_conflist(dir))
        .with_context(|| format!("cannot write {}", conflist.display()))?;

    let cgroup = node.cgroup(&format!("system.slice/{}.service", unique_name("containerd")))?;
    let log_path = dir.join(LOG);
    let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    // `unshare` (no fork) execs sh, which execs containerd: one pid throughout.
    let script = "set -e
mount --make-rshared /
for dir in /run/containerd /var/lib/cni; do mkdir -p $dir; mount -t tmpfs -o mode=0711 tmpfs $dir; done
mount -t bpf bpf /sys/fs/bpf
exec containerd --config \"$1\"";
    let mut command = node.command(&cgroup, "unshare")?;
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    command.spawn().context("cannot start containerd")
}

/// A mount namespace, held open: while it is, the kernel cannot free it and give its inode number
/// to a new namespace (another test's container's), so processes found by that number are its own.
struct MountNamespace {
    inode: u64,
    _handle: File,
}

pub struct Containerd {
    daemon: Child,
    /// containerd's mount namespace: every shim is in it too.
    mount_namespace: Option<MountNamespace>,
    dir: PathBuf,
    snapshotter: &'static str,
}

impl Containerd {
    /// Starts containerd in `node` and waits (bounded) until it answers on its socket.
    pub fn start(node: &SimNode) -> Result<Self> {
        for command in ["containerd", "ctr", "containerd-shim-runc-v2", RUNC] {
            ensure!(
                which(command),
                "{command} is missing: run `cargo xtask test` (Debian packages containerd, runc)"
            );
        }
        ensure!(
            Path::new(CNI_BIN_DIR).join("bridge").exists(),
            "{CNI_BIN_DIR}/bridge is missing: run `cargo xtask test` (Debian package containernetworking-plugins)"
        );
        let dir = tempfile::Builder::new()
            .prefix("itc-containerd-")
            .tempdir_in(instance_parent())
            .context("cannot create containerd's directory")?
            .keep();
        let launched =
            snapshotter_for(&dir).and_then(|snapshotter| Ok((snapshotter, launch(node, &dir, snapshotter)?)));
        let (snapshotter, daemon) = match launched {
            Ok(launched) => launched,
            Err(err) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        // From here on, dropping the instance stops containerd and removes the directory.
        let mut instance = Self {
            daemon,
            mount_namespace: None,
            dir,
            snapshotter,
        };
        instance.wait_until_answering()?;
        Ok(instance)
    }

    fn wait_until_answering(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.daemon.try_wait()? {
                bail!(
                    "containerd exited before answering ({status}); its log:\n{}",
                    self.log_tail()
                );
            }
            if self.ctr(&["version"]).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer on {} within {START_DEADLINE:?}; its log:\n{}",
                    self.socket().display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mount_namespace = Some(self.own_mount_namespace()?);
        Ok(())
    }

    /// containerd's mount namespace, once it is not the test's own (which it is until `unshare` runs).
    fn own_mount_namespace(&self) -> Result<MountNamespace> {
        let ours = fs::metadata("/proc/self/ns/mnt")?.ino();
        let handle = File::open(format!("/proc/{}/ns/mnt", self.pid()))
            .context("cannot open containerd's mount namespace")?;
        let inode = handle.metadata()?.ino();
        ensure!(inode != ours, "containerd runs in the test's own mount namespace");
        Ok(MountNamespace {
            inode,
            _handle: handle,
        })
    }

    /// containerd's gRPC socket (CRI and containerd's own API).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The inode of containerd's mount namespace (`/proc/<pid>/ns/mnt`), which its shims share.
    pub fn mount_namespace(&self) -> Option<u64> {
        self.mount_namespace.as_ref().map(|namespace| namespace.inode)
    }

    /// containerd's log (its stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    /// The directory that holds everything of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshotter images are unpacked into: overlayfs, or native when the directory is itself on
    /// overlayfs (overlay on overlay fails).
    pub fn snapshotter(&self) -> &'static str {
        self.snapshotter
    }

    /// Where a path of containerd's mount namespace is seen from the host's (its `/sys/fs/bpf`, say).
    pub fn path_in_mount_namespace(&self, path: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid())).join(path.trim_start_matches('/'))
    }

    /// The last lines of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `ctr` against this instance (namespace as given by the args, `default` otherwise) and
    /// returns its standard output. Once containerd is up, ctr runs in its mount namespace: ctr makes
    /// the stdio fifos of `ctr run` and `ctr tasks exec` under `/run/containerd/fifo`, which the shims
    /// must see (and which must not appear on the host).
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut command = match self.mount_namespace() {
            Some(_) => {
                let mut nsenter = Command::new("nsenter");
                nsenter
                    .arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
                    .args(["--", "ctr"]);
                nsenter
            }
            None => Command::new("ctr"),
        };
        let out = command
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ctr (package containerd)")?;
        ensure!(
            out.status.success(),
            "ctr {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an `oci-archive` into CRI's namespace, unpacked for the snapshotter CRI uses. An archive
    /// whose manifest is tagged `T` becomes `<base_name>:T` (`localhost/...`: CRI wants fully qualified
    /// names).
    pub fn import_image(&self, oci_archive: &Path, base_name: &str) -> Result<()> {
        let archive = oci_archive
            .to_str()
            .with_context(|| format!("{} is not UTF-8", oci_archive.display()))?;
        self.ctr(&[
            "--namespace",
            CRI_NAMESPACE,
            "images",
            "import",
            "--base-name",
            base_name,
            "--snapshotter",
            self.snapshotter,
            archive,
        ])
        .with_context(|| format!("cannot import {archive} as {base_name}"))?;
        Ok(())
    }

    /// The image references in CRI's namespace.
    pub fn images(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr(&["--namespace", CRI_NAMESPACE, "images", "ls", "--quiet"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// containerd's config (version 2), measured to work with Debian's 1.6.20 on this hybrid-cgroup,
    /// systemd-less host (notes/issue20-research.md, section 2).
    fn config(dir: &Path, snapshotter: &str) -> String {
        let dir = dir.display();
        format!(
            r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
# Fail fast when CRI does not load.
required_plugins = ["io.containerd.grpc.v1.cri"]
# Not io.containerd.runtime.v1.linux: 1.6's tasks service needs it.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
# Leave containerd's score alone: lowering it needs CAP_SYS_RESOURCE, which this host may lack.
oom_score = 0

[grpc]
  address = "{dir}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/root/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # CRI lowers sandboxes to -998 otherwise, which needs CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{dir}/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{RUNC}"
        Root = "{dir}/state/runc"
"#
        )
    }

    /// A bridge network in the node's namespace; no masquerading (no iptables), addresses from
    /// [`POD_SUBNET`] with IPAM state in this instance's directory.
    fn cni_conflist(dir: &Path) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "interceptor-test",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }],
        })
        .to_string()
    }

    /// The `cgroupsPath` of every task bundle in the state directory: runc's container cgroups.
    fn task_cgroups(&self) -> Vec<String> {
        let bundles_root = self.dir.join("state").join(TASK_BUNDLES);
        read_dir_paths(&bundles_root)
            .iter()
            .flat_map(|namespace| read_dir_paths(namespace))
            .filter_map(|bundle| {
                let spec = fs::read(bundle.join("config.json")).ok()?;
                let spec: serde_json::Value = serde_json::from_slice(&spec).ok()?;
                spec["linux"]["cgroupsPath"].as_str().map(str::to_owned)
            })
            .collect()
    }

    /// Everything [`Drop`] does, with what went wrong.
    fn stop(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Read before containerd goes: a start that failed early may not have recorded it.
        let mount_namespace = self
            .mount_namespace
            .take()
            .or_else(|| self.own_mount_namespace().ok());
        let task_cgroups = self.task_cgroups();
        if self.daemon.try_wait().ok().flatten().is_none() {
            kill(self.pid() as i32, libc::SIGTERM);
            let deadline = Instant::now() + STOP_DEADLINE;
            while self.daemon.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    problems.push(format!(
                        "containerd ignored SIGTERM for {STOP_DEADLINE:?}: killed"
                    ));
                    let _ = self.daemon.kill();
                    let _ = self.daemon.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Shims outlive containerd; they, and anything else left but the containers (which runc gives
        // mount namespaces of their own), are in its mount namespace. No pid files are trusted: a pid
        // may have been reused.
        if let Some(namespace) = &mount_namespace {
            let deadline = Instant::now() + STOP_DEADLINE;
            loop {
                let left = processes_in_mount_namespace(namespace.inode);
                if left.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    problems.push(format!("processes {left:?} outlived SIGKILL"));
                    break;
                }
                for pid in left {
                    kill(pid, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The containers' processes, orphaned by their shims, go with their cgroups (cgroup.kill).
        for cgroups_path in &task_cgroups {
            if let Err(err) = remove_container_cgroup(cgroups_path) {
                problems.push(format!("{err:#}"));
            }
        }
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            problems.push(format!("cannot remove {}: {err}", self.dir.display()));
        }
        problems
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for problem in self.stop() {
            eprintln!("warning: containerd {}: {problem}", self.dir.display());
        }
    }
}

/// Removes a container's cgroup as runc's cgroupfs driver made it: `cgroups_path` under the cgroup2
/// mount (killing what is left in it) and under every v1 hierarchy. A systemd-form path
/// (`slice:prefix:name`) is not runc's cgroupfs layout and is left alone.
pub fn remove_container_cgroup(cgroups_path: &str) -> Result<()> {
    if cgroups_path.contains(':') || cgroups_path.is_empty() {
        return Ok(());
    }
    let relative = cgroups_path.trim_start_matches('/');
    let mut problems = Vec::new();
    let v2 = interceptor::identity::cgroup2_mount()?.join(relative);
    if v2.exists()
        && let Err(err) = crate::cgroup::remove_tree(&v2)
    {
        problems.push(format!("{}: {err}", v2.display()));
    }
    for hierarchy in cgroup_v1_hierarchies()? {
        let dir = hierarchy.join(relative);
        if !dir.exists() {
            continue;
        }
        // Its processes are gone with the v2 cgroup's; the kernel may take a moment to let go.
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Err(err) = remove_v1_tree(&dir, deadline) {
            problems.push(err);
        }
    }
    ensure!(
        problems.is_empty(),
        "cannot remove cgroup {cgroups_path}: {}",
        problems.join("; ")
    );
    Ok(())
}

/// Removes the v1 cgroup `dir` and every cgroup below it, deepest first, each retried until
/// `deadline`.
fn remove_v1_tree(dir: &Path, deadline: Instant) -> Result<(), String> {
    for child in read_dir_paths(dir).into_iter().filter(|path| path.is_dir()) {
        remove_v1_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() >= deadline => return Err(format!("{}: {err}", dir.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The cgroup tree a test gives its kubelet as `--cgroup-root` (`/<unique name>`), removed on drop
/// in v2 and every v1 hierarchy with whatever pods a failing test left in it. Declared before the
/// [`Containerd`] instance, it drops after containerd has stopped the shims.
pub struct KubeletCgroupRoot(String);

impl KubeletCgroupRoot {
    /// A new, unique root (`/itc-kubelet<n>`); nothing is made until containerd makes pods below it.
    pub fn new() -> Self {
        Self(format!("/{}", crate::unique_name("itc-kubelet")))
    }

    /// The root as the kubelet's `--cgroup-root` takes it.
    pub fn path(&self) -> &str {
        &self.0
    }
}

impl Default for KubeletCgroupRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KubeletCgroupRoot {
    fn drop(&mut self) {
        if let Err(err) = remove_container_cgroup(&self.0) {
            eprintln!("warning: {err:#}");
        }
    }
}

/// The mount points of the cgroup v1 hierarchies (none on a pure v2 host).
pub fn cgroup_v1_hierarchies() -> Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| {
            let (mount_fields, fs_fields) = line.split_once(" - ")?;
            let fs_type = fs_fields.split_whitespace().next()?;
            let mount_point = mount_fields.split_whitespace().nth(4)?;
            (fs_type == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect())
}

/// The processes whose mount namespace has inode `namespace`.
pub fn processes_in_mount_namespace(namespace: u64) -> Vec<i32> {
    read_dir_paths(Path::new("/proc"))
        .into_iter()
        .filter_map(|dir| {
            let pid = dir.file_name()?.to_str()?.parse::<i32>().ok()?;
            let ino = fs::metadata(dir.join("ns/mnt")).ok()?.ino();
            // A zombie has no namespaces left to read, so it is not counted.
            (ino == namespace).then_some(pid)
        })
        .collect()
}

/// overlayfs, unless `dir` is itself on overlayfs (containers in containers), where only native works.
fn snapshotter_for(dir: &Path) -> Result<&'static str> {
    Ok(if on_overlayfs(dir)? { "native" } else { "overlayfs" })
}

/// Where an instance's directory goes: the temporary directory, unless that is on overlayfs (the
/// kernel matrix's VMs) and `/dev/shm` is not: there the overlayfs snapshotter still works, where the
/// native one would copy every image for every container.
fn instance_parent() -> PathBuf {
    let temp = std::env::temp_dir();
    let shm = Path::new("/dev/shm");
    match (on_overlayfs(&temp), on_overlayfs(shm)) {
        (Ok(true), Ok(false)) => shm.to_path_buf(),
        _ => temp,
    }
}

fn on_overlayfs(dir: &Path) -> Result<bool> {
    const OVERLAYFS_SUPER_MAGIC: libc::c_long = 0x794c_7630;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated and outlives the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", dir.display()));
    }
    Ok(stat.f_type == OVERLAYFS_SUPER_MAGIC)
}

fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.filter_map(|entry| Some(entry.ok()?.path())).collect())
        .unwrap_or_default()
}

fn kill(pid: i32, signal: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, which is fine here.
        unsafe { libc::kill(pid, signal) };
    }
}

fn which(command: &str) -> bool {
    if command.starts_with('/') {
        return Path::new(command).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).exists()))
}
