//! identity: the cgroup v2 filesystem the kernel's cgroup ids refer to (where it is mounted, which id
//! a cgroup directory has, which directory an id names) and what a kubelet-made cgroup path says: the
//! pod UID and container id.

use std::{
    fs::{self, File},
    io,
    num::NonZeroUsize,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use interceptor_common::CgroupId;
use lru::LruCache;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (looked in {mountinfo})")]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("no cgroup has id {0} (it may have been removed)")]
    UnknownId(u64),
    #[error("cannot open cgroup id {id} by handle (needs CAP_DAC_READ_SEARCH)")]
    OpenByHandle {
        id: u64,
        #[source]
        source: io::Error,
    },
    #[error("cgroup id {id} resolves to {path}, outside the cgroup2 mount")]
    OutsideMount { id: u64, path: PathBuf },
}

/// Where the cgroup v2 hierarchy is mounted, read from `/proc/self/mountinfo`: `/sys/fs/cgroup` on pure
/// v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = PathBuf::from("/proc/self/mountinfo");
    let text = fs::read_to_string(&mountinfo).map_err(|source| CgroupError::Read {
        path: mountinfo.clone(),
        source,
    })?;
    find_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2 { mountinfo })
}

/// The mount point of the first cgroup2 line of a mountinfo text (proc(5): fields up to " - ", then the
/// filesystem type).
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let fs_type = fs_fields.split_whitespace().next()?;
        let mount_point = mount_fields.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as three-digit octal.
fn unescape_mount_path(escaped: &str) -> String {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id the kernel gives the cgroup at `dir`: the inode number of that cgroup2 directory.
pub fn cgroup_id(dir: &Path) -> Result<CgroupId, CgroupError> {
    fs::metadata(dir)
        .map(|meta| CgroupId(meta.ino()))
        .map_err(|source| CgroupError::Read {
            path: dir.to_path_buf(),
            source,
        })
}

/// The id of the root of the caller's cgroup namespace: in a container with a private cgroup namespace,
/// the container's own cgroup. A cgroup2 file system mounted inside the namespace shows that cgroup as
/// its root, so the root directory's inode is the id. The mount is private to a temporary directory and
/// removed at once. (In the initial namespace this is the host's root cgroup.)
pub fn cgroup_namespace_root_id() -> std::io::Result<CgroupId> {
    let dir = std::env::temp_dir().join(format!("interceptor-cgroupns-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain mount(2) and umount2(2) on a directory we just made, with NUL-terminated strings
    // that outlive the calls.
    let mounted = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    let id = if mounted == 0 {
        let id = fs::metadata(&dir).map(|meta| CgroupId(meta.ino()));
        // SAFETY: see above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        id
    } else {
        Err(std::io::Error::last_os_error())
    };
    let _ = fs::remove_dir(&dir);
    id
}

/// A cgroup directory relative to the cgroup2 mount, without a leading slash
/// (`kubepods.slice/kubepods-besteffort.slice/...`, `system.slice/billing.service`; empty for the root).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CgroupPath(Arc<str>);

impl CgroupPath {
    pub fn new(relative: &str) -> Self {
        Self(relative.trim_matches('/').into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Turns cgroup ids into paths. The kernel hands out cgroup ids (kernfs inode numbers) once and never
/// reuses them, so an id's path is cached until evicted; a miss costs one `open_by_handle_at`, never a
/// walk of the cgroup tree. A cgroup can still be removed or renamed after its path was cached, so a
/// hit is served only while that path is still the same cgroup (one `stat`).
pub struct CgroupPaths {
    mount: PathBuf,
    mount_dir: File,
    /// The cgroup2 filesystem's device: a cached path is checked against its inode on this device.
    mount_dev: u64,
    cache: Mutex<LruCache<CgroupId, CgroupPath>>,
}

/// kernfs file handles (`FILEID_KERNFS`, include/linux/exportfs.h) carry the 64-bit node id, which for a
/// cgroup is its cgroup id.
const FILEID_KERNFS: i32 = 0xfe;

#[repr(C)]
struct KernfsFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    cgroup_id: [u8; 8],
}

impl CgroupPaths {
    pub fn new(mount: PathBuf, capacity: NonZeroUsize) -> Result<Self, CgroupError> {
        let read_error = |source| CgroupError::Read {
            path: mount.clone(),
            source,
        };
        let mount_dir = File::open(&mount).map_err(read_error)?;
        let mount_dev = mount_dir.metadata().map_err(read_error)?.dev();
        Ok(Self {
            mount,
            mount_dir,
            mount_dev,
            cache: Mutex::new(LruCache::new(capacity)),
        })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The path of the cgroup with id `cgroup_id`, relative to the mount.
    pub fn path_of(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError> {
        if let Some(path) = self.cached(cgroup_id) {
            return Ok(path);
        }
        let path = self.resolve(cgroup_id)?;
        self.lock().put(cgroup_id, path.clone());
        Ok(path)
    }

    /// The cached path of `cgroup_id`, if that path still is that cgroup; a stale entry is dropped,
    /// so a removed cgroup never resolves and a renamed one is resolved afresh. The check runs outside
    /// the lock; should another thread re-cache the id meanwhile, the drop costs it one more resolve.
    fn cached(&self, cgroup_id: CgroupId) -> Option<CgroupPath> {
        let path = self.lock().get(&cgroup_id).cloned()?;
        if self.still_names(&path, cgroup_id) {
            return Some(path);
        }
        self.lock().pop(&cgroup_id);
        None
    }

    /// Whether the directory at `path` is the cgroup `cgroup_id`: same inode on the cgroup2 filesystem.
    fn still_names(&self, path: &CgroupPath, cgroup_id: CgroupId) -> bool {
        fs::symlink_metadata(self.mount.join(path.as_str()))
            .is_ok_and(|meta| meta.ino() == cgroup_id.0 && meta.dev() == self.mount_dev)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<CgroupId, CgroupPath>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn resolve(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError> {
        let id = cgroup_id.0;
        let mut handle = KernfsFileHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            cgroup_id: id.to_ne_bytes(),
        };
        // SAFETY: `handle` is a valid file_handle header followed by its `handle_bytes` bytes, and lives
        // across the call; the returned fd, when valid, is ours to own.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount_dir.as_raw_fd(),
                (&raw mut handle).cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ESTALE | libc::ENOENT) => CgroupError::UnknownId(id),
                _ => CgroupError::OpenByHandle { id, source },
            });
        }
        // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let path = fs::read_link(&link).map_err(|source| CgroupError::Read { path: link, source })?;
        let relative = path
            .strip_prefix(&self.mount)
            .map_err(|_| CgroupError::OutsideMount {
                id,
                path: path.clone(),
            })?;
        Ok(CgroupPath::new(&relative.to_string_lossy()))
    }
}

/// Turns cgroup ids into paths: [`CgroupPaths`], or a table in tests.
pub trait CgroupResolver: Send + Sync {
    fn path_of(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError>;
}

impl CgroupResolver for CgroupPaths {
    fn path_of(&self, cgroup_id: CgroupId) -> Result<CgroupPath, CgroupError> {
        CgroupPaths::path_of(self, cgroup_id)
    }
}

/// A pod's UID as the kubelet names its cgroup: the API server's lowercase 8-4-4-4-12 hex digits, or,
/// for a static pod (from a manifest on the node), the 32 hex digits of the kubelet's config hash, which
/// its mirror pod carries in the `kubernetes.io/config.mirror` annotation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodUid(String);

impl PodUid {
    /// Accepts either form in either case; anything else is not a pod UID.
    pub fn parse(text: &str) -> Option<Self> {
        let groups: Vec<&str> = text.split('-').collect();
        let lengths = groups.iter().map(|group| group.len());
        let shaped = (lengths.clone().eq([8, 4, 4, 4, 12]) || lengths.eq([32]))
            && groups
                .iter()
                .all(|group| group.bytes().all(|b| b.is_ascii_hexdigit()));
        shaped.then(|| Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A container's id as the runtime names it: 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerId(String);

impl ContainerId {
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a kubelet-made cgroup path says about the process in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub pod_uid: PodUid,
    /// `None` for a process in the pod-level cgroup itself or in a runtime's monitor scope.
    pub container_id: Option<ContainerId>,
}

/// Scope prefixes of container cgroups under the systemd driver: containerd, CRI-O, cri-dockerd.
const CONTAINER_SCOPE_PREFIXES: [&str; 3] = ["cri-containerd-", "crio-", "docker-"];
/// CRI-O's per-container monitor: part of the pod, not a container.
const CRIO_MONITOR_PREFIX: &str = "crio-conmon-";

/// Parses a cgroup path relative to the cgroup2 mount, in the kubelet's systemd or cgroupfs layout,
/// under any prefix (nested kubelets, `--cgroup-root`): the pod is found by its `pod<uid>` segment
/// wherever it is, the container by the segment right below it. `None` when no segment names a pod.
pub fn parse_pod_cgroup(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|segment| !segment.is_empty()).collect();
    let (pod_index, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(index, segment)| pod_uid_of_segment(segment).map(|uid| (index, uid)))?;
    let container_id = segments
        .get(pod_index + 1)
        .and_then(|segment| container_id_of_segment(segment));
    Some(PodCgroup {
        pod_uid,
        container_id,
    })
}

/// `kubepods-burstable-pod<uid_with_underscores>.slice`, `kubepods-pod<uid>.slice` (systemd, which
/// escapes the UID's dashes as underscores) or `pod<uid>` (cgroupfs).
fn pod_uid_of_segment(segment: &str) -> Option<PodUid> {
    match segment.strip_suffix(".slice") {
        Some(unit) => PodUid::parse(&unit.rsplit_once("-pod")?.1.replace('_', "-")),
        None => PodUid::parse(segment.strip_prefix("pod")?),
    }
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (systemd) or `<id>` (cgroupfs).
fn container_id_of_segment(segment: &str) -> Option<ContainerId> {
    let Some(unit) = segment.strip_suffix(".scope") else {
        return ContainerId::parse(segment);
    };
    if unit.starts_with(CRIO_MONITOR_PREFIX) {
        return None;
    }
    CONTAINER_SCOPE_PREFIXES
        .iter()
        .find_map(|prefix| ContainerId::parse(unit.strip_prefix(prefix)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "9ac48755-3968-48e4-b9dc-6d4b69f3bb42";
    const UID_SYSTEMD: &str = "9ac48755_3968_48e4_b9dc_6d4b69f3bb42";
    const CID: &str = "4a1c3b0e5f6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";

    fn parsed(path: &str) -> Option<(String, Option<String>)> {
        parse_pod_cgroup(path).map(|found| {
            (
                found.pod_uid.as_str().to_owned(),
                found.container_id.map(|id| id.as_str().to_owned()),
            )
        })
    }

    fn pod_and_container() -> Option<(String, Option<String>)> {
        Some((UID.to_owned(), Some(CID.to_owned())))
    }

    #[test]
    fn systemd_driver_every_qos_class_and_runtime() {
        for qos_slices in [
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"),
            format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice"),
        ] {
            for runtime in ["cri-containerd", "crio", "docker"] {
                let path = format!("{qos_slices}/{runtime}-{CID}.scope");
                assert_eq!(parsed(&path), pod_and_container(), "{path}");
            }
        }
    }

    #[test]
    fn cgroupfs_driver() {
        assert_eq!(
            parsed(&format!("kubepods/burstable/pod{UID}/{CID}")),
            pod_and_container()
        );
        assert_eq!(parsed(&format!("/kubepods/pod{UID}/{CID}")), pod_and_container());
    }

    #[test]
    fn nested_prefixes_are_skipped() {
        let kind = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parsed(&kind), pod_and_container());
        assert_eq!(
            parsed(&format!("kubelet/kubepods/burstable/pod{UID}/{CID}")),
            pod_and_container()
        );
    }

    #[test]
    fn pod_level_and_monitor_cgroups_have_no_container() {
        let pod_only = Some((UID.to_owned(), None));
        assert_eq!(
            parsed(&format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice")),
            pod_only
        );
        let conmon = format!("kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{CID}.scope");
        assert_eq!(parsed(&conmon), pod_only);
    }

    #[test]
    fn static_pods_are_named_by_their_config_hash() {
        let hash = "6a9a5f6a0f2c2f2a0f2d0c4d0c1a1d2e";
        let expected = Some((hash.to_owned(), Some(CID.to_owned())));
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parsed(&systemd), expected);
        assert_eq!(parsed(&format!("kubepods/burstable/pod{hash}/{CID}")), expected);
        assert!(PodUid::parse(&hash[1..]).is_none());
        assert!(PodUid::parse(&format!("{}g", &hash[1..])).is_none());
    }

    #[test]
    fn paths_without_a_pod_are_not_pods() {
        for path in [
            "system.slice/billing.service",
            &format!("system.slice/docker-{CID}.scope"),
            "user.slice/user-1000.slice/session-3.scope",
            "kubepods.slice/kubepods-besteffort.slice",
            "kubepods.slice/kubepods-podnot-a-uid.slice",
            "",
        ] {
            assert_eq!(parsed(path), None, "{path}");
        }
    }

    #[test]
    fn uids_and_ids_are_validated_and_lowercased() {
        assert_eq!(PodUid::parse(&UID.to_uppercase()).unwrap().as_str(), UID);
        assert!(PodUid::parse("9ac48755-3968-48e4-b9dc-6d4b69f3bb4").is_none());
        assert!(PodUid::parse("9ac48755-3968-48e4-b9dc-6d4b69f3bb4g").is_none());
        assert!(ContainerId::parse(&CID[1..]).is_none());
        assert!(ContainerId::parse(&format!("{}z", &CID[1..])).is_none());
    }

    /// A scratch directory standing in for the cgroup2 mount: the ids are its directories' inodes.
    fn scratch_mount(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("interceptor-{test}-{}", std::process::id()));
        fs::create_dir_all(dir.join("svc")).unwrap();
        fs::create_dir_all(dir.join("other")).unwrap();
        dir
    }

    #[test]
    fn a_cached_path_is_served_only_while_it_is_still_its_cgroup() {
        let mount = scratch_mount("cached-path");
        let paths = CgroupPaths::new(mount.clone(), NonZeroUsize::MIN).unwrap();
        let svc = cgroup_id(&mount.join("svc")).unwrap();
        let other = cgroup_id(&mount.join("other")).unwrap();
        // As if both had been resolved, `other` to a path that now holds another directory.
        paths.lock().put(svc, CgroupPath::new("svc"));
        assert_eq!(paths.path_of(svc).unwrap().as_str(), "svc");
        paths.lock().put(other, CgroupPath::new("svc"));
        assert!(
            paths.path_of(other).is_err(),
            "the path names another directory now"
        );
        assert!(paths.lock().peek(&other).is_none(), "the stale entry is dropped");

        paths.lock().put(svc, CgroupPath::new("svc"));
        fs::remove_dir(mount.join("svc")).unwrap();
        assert!(paths.path_of(svc).is_err(), "the directory is gone");
        assert!(paths.lock().peek(&svc).is_none(), "the stale entry is dropped");
        fs::remove_dir_all(&mount).unwrap();
    }

    struct RemoveDirOnDrop(PathBuf);

    impl Drop for RemoveDirOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_dir(&self.0);
        }
    }

    /// Needs a cgroup2 mount where this process may create a cgroup (root); skipped elsewhere.
    #[test]
    fn a_removed_cgroup_stops_resolving_although_it_was_cached() {
        let Ok(mount) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let name = format!("interceptor-unit-{}", std::process::id());
        let dir = mount.join(&name);
        if let Err(err) = fs::create_dir(&dir) {
            eprintln!("skipped: cannot create cgroup {}: {err}", dir.display());
            return;
        }
        // Removes the cgroup should an assertion fail before the test removes it itself.
        let _cleanup = RemoveDirOnDrop(dir.clone());
        let paths = CgroupPaths::new(mount, NonZeroUsize::MIN).unwrap();
        let id = cgroup_id(&dir).unwrap();
        assert_eq!(paths.path_of(id).unwrap().as_str(), name);
        fs::remove_dir(&dir).unwrap();
        assert!(matches!(paths.path_of(id), Err(CgroupError::UnknownId(gone)) if gone == id.0));
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_the_unified_mount_on_hybrid_hosts() {
        assert_eq!(
            find_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_mount_on_pure_v2_hosts_with_optional_fields() {
        assert_eq!(find_cgroup2_mount(PURE_V2), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_line_means_none() {
        assert_eq!(
            find_cgroup2_mount("40 31 0:37 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(unescape_mount_path(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_mount_path(r"/odd\x"), r"/odd\x");
    }
}
