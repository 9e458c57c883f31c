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

use super::{DEFAULT_AGENT_PORT, DEFAULT_BPFFS_DIR, DEFAULT_METRICS_PORT, KUBEPODS_CGROUPS, detect_kubepods};
use crate::{
    bpf::{self, Interceptor, Mode, PROGRAMS, RedirectConfig, pin},
    identity::{self, CgroupError, CgroupPaths},
};

#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// cgroup v2 directory whose subtree is guarded, as the agent's --cgroup-root, made when missing
    /// [default: the kubelet's kubepods cgroup under the cgroup2 mount; `kubepods.slice` is made
    /// there when neither it nor `kubepods` exists yet, as before the kubelet's first start]
    #[arg(long, env = "INTERCEPTOR_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where the programs are pinned, the agent's --bpffs-dir.
    #[arg(long, env = "INTERCEPTOR_BPFFS_DIR", value_name = "PATH", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// The agent's metadata port (of its --agent-addr): no workload may bind it.
    #[arg(long, env = "INTERCEPTOR_AGENT_PORT", value_name = "PORT", default_value_t = DEFAULT_AGENT_PORT)]
    pub agent_port: u16,
    /// The agent's health port (of its --metrics-addr): no workload may bind it.
    #[arg(long, env = "INTERCEPTOR_METRICS_PORT", value_name = "PORT", default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
}

/// The systemd driver's kubepods cgroup: the guard makes it when neither it nor the cgroupfs
/// driver's exists yet (pass --cgroup-root for the cgroupfs driver's).
const KUBEPODS_SLICE: &str = KUBEPODS_CGROUPS[0];

/// `interceptor guard`: refuses pods' metadata connects and guards the agent's ports until an agent
/// serves. Does nothing where anything is pinned already (an agent's of any version, or an earlier
/// guard's): on a running node it must never take over from the agent.
pub fn run(args: &GuardArgs) -> Result<()> {
    if pin::any_links(&args.bpffs_dir)? {
        println!(
            "interceptor guard: programs are pinned in {} already; left as they are",
            args.bpffs_dir.display()
        );
        return Ok(());
    }
    let mount = identity::cgroup2_mount()?;
    let cgroup_root = match &args.cgroup_root {
        Some(root) => made(root)?,
        None if KUBEPODS_CGROUPS.iter().all(|name| !mount.join(name).exists()) => {
            made(&mount.join(KUBEPODS_SLICE))?
        }
        None => detect_kubepods(&mount)?,
    };
    let mut programs = RedirectConfig::guard(cgroup_root, vec![args.agent_port, args.metrics_port]);
    programs.node_netns_cookie = bpf::netns_cookie().context("cannot read the network namespace's cookie")?;
    programs.pin_dir = Some(args.bpffs_dir.clone());
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

/// `cgroup`, made when it does not exist yet (the kubelet has not run since the boot; it takes the
/// directory over as it finds it).
fn made(cgroup: &Path) -> Result<PathBuf> {
    if !cgroup.is_dir() {
        std::fs::create_dir(cgroup).with_context(|| format!("cannot make {}", cgroup.display()))?;
        println!("interceptor guard: made {}", cgroup.display());
    }
    Ok(cgroup.to_owned())
}

/// The agent's first act. Exempts `programs`' exempt cgroups (the agent's own) in every pinned
/// layout, pruning the entries of cgroups that are gone, and adds its guarded ports to the pinned set;
/// then, unless every program is pinned already on `programs`' cgroup root (a previous agent's, which
/// keep redirecting to this agent's port and are replaced once it listens, or a guard's), attaches
/// `programs` refusing, and returns them: the agent switches them to redirect once it listens.
pub fn hold(programs: &RedirectConfig, cgroups: &Arc<CgroupPaths>) -> Result<Option<Interceptor>> {
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
    let root_id = identity::cgroup_id(&programs.cgroup_root)?;
    if pin::PinDir::at(pin_dir).holds_all(&PROGRAMS, root_id.0)? {
        tracing::info!(bpffs_dir = %pin_dir.display(), "programs are pinned already: they hold until this agent's replace them");
        return Ok(None);
    }
    let interceptor = Interceptor::attach(&programs.refusing())
        .context("cannot attach the programs that refuse metadata connects")?;
    tracing::info!(bpffs_dir = %pin_dir.display(), "metadata connects refused until this agent serves");
    Ok(Some(interceptor))
}

/// After `err` kept the agent from serving, leaves the programs refusing, so no redirect is left
/// pointing at a port the agent does not hold: `held`, the agent's own, refuse already; programs a
/// previous agent pinned are replaced by refusing ones. Returns `err`, with what became of them.
pub fn refuse_after(
    programs: &RedirectConfig,
    held: Option<&Interceptor>,
    err: anyhow::Error,
) -> anyhow::Error {
    let refused = match held {
        Some(interceptor) => interceptor.set_mode(Mode::Refuse),
        None => Interceptor::attach(&programs.refusing()).map(drop),
    };
    match refused {
        Ok(()) => err.context("pods' metadata connects are refused until an agent serves"),
        Err(refuse_err) => err.context(format!(
            "pods' metadata connects could not be set to be refused ({refuse_err:#})"
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
    fn a_cgroup_root_is_made_when_missing_and_left_when_there() {
        let dir = std::env::temp_dir().join(format!("interceptor-guard-made-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("kubepods");
        assert_eq!(made(&root).unwrap(), root);
        assert!(root.is_dir());
        std::fs::write(root.join("marker"), "").unwrap();
        assert_eq!(made(&root).unwrap(), root, "an existing one is taken as it is");
        assert!(root.join("marker").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
