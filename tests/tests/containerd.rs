//! The tests' own containerd (`interceptor_tests::containerd`) in a simulated node: it answers on its
//! socket, runs where it should (the node's network namespace, a mount namespace of its own), imports
//! an image made by the tests' OCI writer, runs a container of it, and leaves nothing behind: no
//! process, cgroup, mount or directory.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use interceptor_tests::{
    containerd::{
        CRI_NAMESPACE, Containerd, PAUSE_IMAGE, cgroup_v1_hierarchies, processes_in_mount_namespace,
        remove_container_cgroup,
    },
    oci_archive,
    privileged::can_run,
    sim::SimNode,
    unique_name,
};

#[test]
fn a_private_containerd_answers_imports_and_runs_an_image_and_leaves_nothing_behind() -> Result<()> {
    if !can_run("a_private_containerd_answers_imports_and_runs_an_image_and_leaves_nothing_behind") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let started = Instant::now();
    let containerd = Containerd::start(&node)?;
    let start_time = started.elapsed();
    let pid = containerd.pid();
    let dir = containerd.dir().to_path_buf();
    let mount_namespace = containerd
        .mount_namespace()
        .context("no mount namespace recorded")?;

    // Where it runs: not the test's network or mount namespace; its private mounts over the paths
    // containerd 1.6 and libcni hard-code, and its own bpffs.
    for namespace in ["net", "mnt"] {
        let ours = fs::metadata(format!("/proc/self/ns/{namespace}"))?.ino();
        let its = fs::metadata(format!("/proc/{pid}/ns/{namespace}"))?.ino();
        assert_ne!(ours, its, "containerd shares the test's {namespace} namespace");
    }
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    for (mount_point, fs_type) in [
        ("/run/containerd", "tmpfs"),
        ("/var/lib/cni", "tmpfs"),
        ("/sys/fs/bpf", "bpf"),
    ] {
        assert!(
            mounts
                .lines()
                .any(|line| mount_point_and_type(line) == Some((mount_point, fs_type))),
            "no {fs_type} on {mount_point} in containerd's mount namespace:\n{mounts}"
        );
    }
    let root = mounts
        .lines()
        .find(|line| mount_point_and_type(line).is_some_and(|(point, _)| point == "/"))
        .context("no / in containerd's mountinfo")?;
    assert!(
        root.contains(" shared:"),
        "/ is not shared in containerd's mount namespace: {root}"
    );

    // An image from the tests' OCI writer, imported as CRI's pause image.
    let archive_dir = tempfile::tempdir()?;
    let archive = archive_dir.path().join("pause.tar");
    oci_archive::write_sleeper(&archive, "1")?;
    let started = Instant::now();
    containerd.import_image(&archive, "localhost/interceptor-test/pause")?;
    let import_time = started.elapsed();
    let images = containerd.images()?;
    assert!(
        images.iter().any(|image| image == PAUSE_IMAGE),
        "{PAUSE_IMAGE} not among {images:?}"
    );

    // A container of it through runc, in a cgroup of the test's choosing, left running for Drop.
    let id = unique_name("itc-ctr");
    let cgroups_path = format!("/{id}");
    // runc makes the cgroup before a start can fail, and a failed task leaves no bundle for Drop.
    let _container_cgroup = ContainerCgroup(cgroups_path.clone());
    let started = Instant::now();
    containerd.ctr(&[
        "--namespace",
        CRI_NAMESPACE,
        "run",
        "--detach",
        "--snapshotter",
        containerd.snapshotter(),
        "--cgroup",
        &cgroups_path,
        PAUSE_IMAGE,
        &id,
    ])?;
    let init_pid = running_task_pid(&containerd, &id)?;
    let run_time = started.elapsed();
    let cgroup2 = interceptor::identity::cgroup2_mount()?.join(&id);
    let procs = fs::read_to_string(cgroup2.join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|line| line == init_pid.to_string()),
        "the container's init {init_pid} is not in {}: {procs:?}",
        cgroup2.display()
    );
    let hierarchies = cgroup_v1_hierarchies()?;
    eprintln!("v1 hierarchies: {hierarchies:?}");

    let started = Instant::now();
    drop(containerd);
    let stop_time = started.elapsed();

    // Nothing left: processes, mount namespace, cgroups, mounts, directory.
    wait_until_gone(pid as i32)?;
    wait_until_gone(init_pid)?;
    let left = processes_in_mount_namespace(mount_namespace);
    ensure!(
        left.is_empty(),
        "processes {left:?} are still in containerd's mount namespace"
    );
    let leftover_processes = processes_naming(&dir);
    ensure!(
        leftover_processes.is_empty(),
        "processes mentioning {} remain: {leftover_processes:?}",
        dir.display()
    );
    for cgroup in std::iter::once(cgroup2).chain(hierarchies.iter().map(|hierarchy| hierarchy.join(&id))) {
        ensure!(!cgroup.exists(), "{} remains", cgroup.display());
    }
    let host_mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let dir_text = dir.to_str().context("non-UTF-8 directory")?;
    ensure!(
        !host_mounts.contains(dir_text),
        "the host's mount namespace has mounts under {dir_text}"
    );
    ensure!(!dir.exists(), "{} remains", dir.display());
    eprintln!(
        "containerd answered after {start_time:?}; import {import_time:?}; container running after \
         {run_time:?}; drop {stop_time:?}"
    );
    Ok(())
}

/// The pid of `id`'s task once `ctr tasks ls` shows it RUNNING (bounded).
fn running_task_pid(containerd: &Containerd, id: &str) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = containerd.ctr(&["--namespace", CRI_NAMESPACE, "tasks", "ls"])?;
        let running = tasks.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id) && fields.get(2) == Some(&"RUNNING"))
                .then(|| fields.get(1)?.parse().ok())
                .flatten()
        });
        if let Some(pid) = running {
            return Ok(pid);
        }
        ensure!(Instant::now() < deadline, "task {id} not running: {tasks}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `pid` is gone or a zombie nobody has reaped yet.
fn wait_until_gone(pid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(stat)
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z')) =>
            {
                return Ok(());
            }
            Ok(stat) => ensure!(Instant::now() < deadline, "process {pid} still runs: {stat}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes whose command line mentions `dir` (containerd's `--config`, the shims' `-address`).
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// The mount point and filesystem type of a mountinfo line.
fn mount_point_and_type(line: &str) -> Option<(&str, &str)> {
    let (mount_fields, fs_fields) = line.split_once(" - ")?;
    Some((
        mount_fields.split_whitespace().nth(4)?,
        fs_fields.split_whitespace().next()?,
    ))
}

/// Removes a container's cgroup in every hierarchy when dropped, whatever happened to the container.
struct ContainerCgroup(String);

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove_container_cgroup(&self.0) {
            eprintln!("warning: {err:#}");
        }
    }
}
