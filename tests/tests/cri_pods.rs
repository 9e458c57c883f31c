//! Pods made the kubelet's way through CRI on the tests' own containerd: a pod-network pod and a
//! hostNetwork pod, each a sandbox under the kubelet's cgroup parent with a container in it. Shows the
//! cgroup paths containerd gives them, which the agent must recognise, and that everything is removed.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use interceptor_tests::{
    containerd::{Containerd, KubeletCgroupRoot, PAUSE_IMAGE},
    cri::{ContainerSpec, Cri, PodSpec, QosClass, kubelet_cgroup_parent},
    oci_archive,
    privileged::can_run,
    sim::SimNode,
    unique_name,
};

#[tokio::test(flavor = "multi_thread")]
async fn pods_made_through_cri_live_under_the_kubelets_cgroup_parents() -> Result<()> {
    if !can_run("pods made through CRI") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let cgroup_root = KubeletCgroupRoot::new();
    let containerd = Containerd::start(&node)?;
    let images = tempfile::tempdir()?;
    let archive = images.path().join("pause.tar");
    oci_archive::write_sleeper(&archive, "1")?;
    containerd.import_image(&archive, "localhost/interceptor-test/pause")?;
    let cri = Cri::connect(containerd.socket()).await?;
    let logs = tempfile::tempdir()?;

    for host_network in [false, true] {
        let uid = interceptor_tests::sim::random_pod_uid();
        let parent = kubelet_cgroup_parent(cgroup_root.path(), QosClass::BestEffort, &uid);
        let mut pod = PodSpec::new(&unique_name("pod"), "shop", &uid, &parent);
        pod.host_network = host_network;
        pod.logs_dir = logs.path().to_owned();
        std::fs::create_dir_all(pod.log_directory())?;
        let started = Instant::now();
        let sandbox = cri.run_pod_sandbox(&pod.sandbox_config()).await?;
        let sandbox_time = started.elapsed();
        let spec = ContainerSpec::new("app", PAUSE_IMAGE);
        std::fs::create_dir_all(pod.log_directory().join("app"))?;
        let container = cri
            .create_container(&sandbox, &spec.container_config(&pod), &pod.sandbox_config())
            .await?;
        cri.start_container(&container).await?;
        let container_time = started.elapsed();
        let cgroup = cri
            .exec_sync(
                &container,
                &["/bin/busybox", "cat", "/proc/self/cgroup"],
                Duration::from_secs(10),
            )
            .await?;
        let addresses = cri
            .exec_sync(
                &container,
                &["/bin/busybox", "ip", "-4", "-o", "addr"],
                Duration::from_secs(10),
            )
            .await?;
        println!(
            "hostNetwork={host_network}: sandbox in {sandbox_time:?}, container running in \
             {container_time:?}\n/proc/self/cgroup:\n{}addresses:\n{}",
            cgroup.stdout_text(),
            addresses.stdout_text()
        );
        let expected = format!("{parent}/{container}");
        ensure!(
            cgroup.stdout_text().lines().any(|line| line.ends_with(&expected)),
            "no cgroup line ends with {expected}"
        );
        let netns = cri
            .exec_sync(
                &container,
                &["/bin/busybox", "readlink", "/proc/self/ns/net"],
                Duration::from_secs(10),
            )
            .await?;
        // A hostNetwork pod's containers are in the node's network namespace (where containerd runs);
        // another pod's in its own, with an address from the CNI bridge.
        let containerds = std::fs::read_link(format!("/proc/{}/ns/net", containerd.pid()))?;
        ensure!(
            (netns.stdout_text().trim() == containerds.to_string_lossy()) == host_network,
            "hostNetwork={host_network}: the container's {} and containerd's {}",
            netns.stdout_text().trim(),
            containerds.display()
        );
        let has_pod_address = addresses.stdout_text().contains("eth0    inet 10.244.0.");
        ensure!(
            has_pod_address != host_network,
            "hostNetwork={host_network}: {}",
            addresses.stdout_text()
        );

        cri.stop_container(&container, Duration::ZERO).await?;
        cri.remove_container(&container).await?;
        cri.stop_pod_sandbox(&sandbox).await?;
        cri.remove_pod_sandbox(&sandbox).await?;
    }
    drop(containerd);
    let root = cgroup_root.path().to_owned();
    drop(cgroup_root);
    let cgroup2 = interceptor::identity::cgroup2_mount()?;
    ensure!(
        !cgroup2.join(root.trim_start_matches('/')).exists(),
        "{root} remains"
    );
    Ok(())
}
