//! agent::guard: what holds while no agent serves. Pods' connects to the metadata endpoints are
//! refused (EPERM) and the agent's ports guarded against workloads' binds, by the same programs in
//! [`Mode::Refuse`]. `interceptor guard` puts them in place once, from the node's bootstrap before the
//! kubelet starts (after a reboot bpffs is empty, and the kubelet starts pods beside the agent); an
//! agent does it first thing when nothing is pinned, and puts them back when it cannot listen, so it
//! never leaves a redirect to a port it does not hold.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};

use super::{DEFAULT_AGENT_PORT, DEFAULT_BPFFS_DIR, DEFAULT_METRICS_PORT, detect_kubepods};
use crate::{
    bpf::{self, Interceptor, Mode, PROGRAMS, RedirectConfig, pin},
    identity::{self, CgroupError, CgroupPaths},
};

#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// cgroup v2 directory whose subtree is guarded, as the agent's --cgroup-root [default: the
    /// kubelet's kubepods cgroup under the cgroup2 mount; `kubepods.slice` is made there when neither
    /// it nor `kubepods` exists yet, as before the kubelet's first start]
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where the programs are pinned, the agent's --bpffs-dir.
    #[arg(long, env = "INTERCEPTOR_BPFFS_DIR", value_name = "PATH", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// The agent's metadata port (of its --agent-addr): no workload may bind it.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_AGENT_PORT)]
    pub agent_port: u16,
    /// The agent's health port (of its --metrics-addr): no workload may bind it.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
}

/// The systemd driver's kubepods cgroup, which the kubelet of EKS's AMIs, Bottlerocket and Ubuntu
/// makes: the guard makes it when the kubelet has not run yet (the kubelet adopts an existing one).
const KUBEPODS_SLICE: &str = "kubepods.slice";

/// `interceptor guard`: refuses pods' metadata connects and guards the agent's ports until an agent
/// serves. Does nothing where programs are pinned already (an agent's, or an earlier guard's).
pub fn run(args: &GuardArgs) -> Result<()> {
    let mount = identity::cgroup2_mount()?;
    let cgroup_root = match &args.cgroup_root {
        Some(root) => root.clone(),
        None => kubepods_or_make(&mount)?,
    };
    let mut programs = RedirectConfig::refusing(cgroup_root, vec![args.agent_port, args.metrics_port]);
    programs.node_netns_cookie = bpf::netns_cookie().context("cannot read the network namespace's cookie")?;
    programs.pin_dir = Some(args.bpffs_dir.clone());
    if pin::PinDir::at(&args.bpffs_dir).has_links(&PROGRAMS) {
        println!(
            "interceptor guard: programs are pinned in {} already; left as they are",
            args.bpffs_dir.display()
        );
        return Ok(());
    }
    // The programs' log forwarder is a task: attach inside a runtime, then leave them pinned.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async { Interceptor::attach(&programs).map(drop) })?;
    println!(
        "interceptor guard: metadata connects from {} refused, ports {} and {} guarded, until an agent serves (pinned in {})",
        programs.cgroup_root.display(),
        args.agent_port,
        args.metrics_port,
        args.bpffs_dir.display()
    );
    Ok(())
}

/// The kubelet's kubepods cgroup, made (as the systemd driver names it) when it does not exist yet.
fn kubepods_or_make(mount: &Path) -> Result<PathBuf> {
    if let Ok(existing) = detect_kubepods(mount) {
        return Ok(existing);
    }
    let slice = mount.join(KUBEPODS_SLICE);
    std::fs::create_dir(&slice).with_context(|| format!("cannot make {}", slice.display()))?;
    println!(
        "interceptor guard: made {} (the kubelet's systemd driver adopts it; pass --cgroup-root for another)",
        slice.display()
    );
    Ok(slice)
}

/// The agent's first act. Exempts `programs`' exempt cgroups (the agent's own) in every pinned
/// layout, pruning the entries of cgroups that are gone, and adds its guarded ports to the pinned set;
/// then, unless every program is pinned already (a previous agent's, which keep redirecting to this
/// agent's port and are replaced once it listens, or a guard's), attaches `programs` refusing.
pub fn hold(programs: &RedirectConfig, cgroups: &Arc<CgroupPaths>) -> Result<()> {
    let pin_dir = programs
        .pin_dir
        .as_deref()
        .context("the agent's programs are pinned")?;
    for cgroup_id in &programs.exempt_cgroups {
        let exempted = pin::exempt_in_pinned(pin_dir, cgroup_id.0, |id| is_gone(cgroups, id))
            .context("cannot exempt the agent from the pinned programs")?;
        tracing::info!(
            cgroup_id = cgroup_id.0,
            pinned_layouts = exempted.sets,
            pruned = exempted.pruned,
            "exempted the agent's own cgroup"
        );
    }
    pin::guard_ports_in_pinned(pin_dir, &programs.guarded_ports).context("cannot guard the agent's ports")?;
    if pin::PinDir::at(pin_dir).has_links(&PROGRAMS) {
        tracing::info!(bpffs_dir = %pin_dir.display(), "programs are pinned already: they hold until this agent's replace them");
        return Ok(());
    }
    let refusing = RedirectConfig {
        mode: Mode::Refuse,
        ..programs.clone()
    };
    Interceptor::attach(&refusing).context("cannot attach the programs that refuse metadata connects")?;
    tracing::info!(bpffs_dir = %pin_dir.display(), "metadata connects refused until this agent serves");
    Ok(())
}

/// After `err` kept the agent from serving, puts `programs` back to refusing, so no redirect is left
/// pointing at a port the agent does not hold; returns `err`, with what became of the programs.
pub fn refuse_after(programs: &RedirectConfig, err: anyhow::Error) -> anyhow::Error {
    let refusing = RedirectConfig {
        mode: Mode::Refuse,
        ..programs.clone()
    };
    match Interceptor::attach(&refusing) {
        Ok(_) => err.context("pods' metadata connects are refused until an agent serves"),
        Err(refuse_err) => err.context(format!(
            "and the programs could not be set to refuse pods' metadata connects: {refuse_err:#}"
        )),
    }
}

/// Whether the cgroup `id` no longer exists. One that cannot be looked up (no CAP_DAC_READ_SEARCH)
/// counts as existing: an entry is pruned only when it is known to be stale.
fn is_gone(cgroups: &CgroupPaths, id: u64) -> bool {
    matches!(
        cgroups.path_of(interceptor_common::CgroupId(id)),
        Err(CgroupError::UnknownId(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelets_cgroup_is_found_or_made_as_the_systemd_driver_names_it() {
        let mount = tempfile_dir("interceptor-guard-mount");
        let made = kubepods_or_make(&mount).unwrap();
        assert_eq!(made, mount.join("kubepods.slice"));
        assert!(made.is_dir());
        assert_eq!(kubepods_or_make(&mount).unwrap(), made, "found once it exists");

        let cgroupfs = tempfile_dir("interceptor-guard-cgroupfs");
        std::fs::create_dir(cgroupfs.join("kubepods")).unwrap();
        assert_eq!(kubepods_or_make(&cgroupfs).unwrap(), cgroupfs.join("kubepods"));
        assert!(
            !cgroupfs.join("kubepods.slice").exists(),
            "nothing made beside the cgroupfs driver's"
        );
        for dir in [mount, cgroupfs] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    fn tempfile_dir(prefix: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
