//! identity: the cgroup v2 filesystem the kernel's cgroup ids refer to: where it is mounted and which
//! id a cgroup directory has.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use interceptor_common::CgroupId;

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

#[cfg(test)]
mod tests {
    use super::*;

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
