//! The kernel matrix: the privileged kernel-facing tests, built on the host, run inside VMs booted on
//! Debian's generic kernels (pure cgroup v2 at /sys/fs/cgroup, unlike the hybrid layout of our
//! development machines). virtme-ng boots each kernel with the host's root filesystem read-only over
//! 9p, so the guest runs the host's test binaries, `ip` and `curl` as they are. No KVM here: qemu
//! emulates, about a minute per kernel.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf::{self, workspace_cargo, workspace_root},
    install::{ensure_commands, output, run_checked},
    python,
};

/// A kernel series of the matrix: the release known to pass, and the shape of its Debian packages
/// (`<prefix><number><suffix>`) to fall back on the newest sibling when the archive no longer has it.
struct Series {
    name: &'static str,
    pinned: &'static str,
    package_prefix: &'static str,
    package_suffix: &'static str,
}

const MATRIX: [Series; 2] = [
    Series {
        name: "6.1",
        pinned: "6.1.0-50-amd64",
        package_prefix: "linux-image-6.1.0-",
        package_suffix: "-amd64-unsigned",
    },
    Series {
        name: "6.12",
        pinned: "6.12.107+deb12-amd64",
        package_prefix: "linux-image-6.12.",
        package_suffix: "+deb12-amd64-unsigned",
    },
];

/// Per-kernel limit: a boot plus the suite takes about a minute without KVM.
const VM_TIMEOUT_SECONDS: u32 = 900;
const VIRTME_NG: &str = "virtme-ng==1.42";

/// `selection` is `all` or a series name (`6.1`, `6.12`); `agent_image` is the image the runtime
/// tests run, handed to them as `agent_image_var`.
pub fn run_matrix(selection: &str, agent_image: Option<(&str, &Path)>) -> Result<()> {
    let series: Vec<&Series> = MATRIX
        .iter()
        .filter(|s| selection == "all" || s.name == selection)
        .collect();
    if series.is_empty() {
        let names: Vec<&str> = MATRIX.iter().map(|s| s.name).collect();
        bail!(
            "no kernel series {selection:?}; choose all or one of {}",
            names.join(", ")
        );
    }
    ensure_commands(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
    ])?;
    let venv = python::ensure_venv(&[VIRTME_NG])?;
    let tests = build_test_binaries()?;

    let mut results = Vec::new();
    for series in series {
        let release = ensure_kernel(series)?;
        let started = Instant::now();
        let passed = run_in_vm(&venv, &release, &tests, agent_image)?;
        results.push((release, passed, started.elapsed().as_secs()));
    }
    println!("\nkernel matrix:");
    for (release, passed, seconds) in &results {
        println!(
            "  {release}: {} ({seconds} s)",
            if *passed { "pass" } else { "FAIL" }
        );
    }
    if results.iter().any(|(_, passed, _)| !passed) {
        bail!("the privileged tests failed on at least one kernel of the matrix");
    }
    Ok(())
}

/// The kernel release to boot for `series`, installed from Debian's packages when missing.
fn ensure_kernel(series: &Series) -> Result<String> {
    if let Some(installed) = installed_release(series)? {
        return Ok(installed);
    }
    run_checked(Command::new("apt-get").arg("update"))?;
    let pinned_package = format!("linux-image-{}-unsigned", series.pinned);
    let package = if output(Command::new("apt-cache").args(["show", &pinned_package])).is_some() {
        pinned_package
    } else {
        newest_package(series)?
    };
    println!("xtask: installing {package}");
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", &package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    installed_release(series)?.with_context(|| format!("{package} installed no kernel in /boot"))
}

/// The pinned release when its image is in /boot, else any release of the series that is.
fn installed_release(series: &Series) -> Result<Option<String>> {
    let releases: Vec<String> = fs::read_dir("/boot")
        .context("cannot list /boot")?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .filter(|release| package_matches(series, &format!("linux-image-{release}-unsigned")))
        .collect();
    Ok(releases
        .iter()
        .find(|release| *release == series.pinned)
        .or_else(|| releases.iter().max())
        .cloned())
}

fn newest_package(series: &Series) -> Result<String> {
    let escape = |text: &str| text.replace('.', r"\.").replace('+', r"\+");
    let pattern = format!(
        "^{}[0-9]+{}$",
        escape(series.package_prefix),
        escape(series.package_suffix)
    );
    let found = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))
        .context("apt-cache search failed")?;
    found
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|package| package_matches(series, package))
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .map(str::to_owned)
        .with_context(|| format!("no Debian package for kernel series {}", series.name))
}

/// Whether `package` is `<prefix><number><suffix>` of the series (not a cloud or rt flavour).
fn package_matches(series: &Series, package: &str) -> bool {
    package
        .strip_prefix(series.package_prefix)
        .and_then(|rest| rest.strip_suffix(series.package_suffix))
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// Numeric runs compared as numbers, so 6.1.0-50 sorts below 6.1.0-100.
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter(|run| !run.is_empty())
        .filter_map(|run| run.parse().ok())
        .collect()
}

/// The integration tests that run in the VMs: those whose outcome depends on the kernel (the programs,
/// attribution, cgroup ids and paths, the agent on top of them), each with the tests of it left out
/// there. The tests with moto and the AWS clients exercise user space only and would take minutes to
/// start Python under emulation: they run on the host.
const KERNEL_TESTS: [(&str, &[&str]); 9] = [
    ("redirect", &[]),
    ("attribution", &[]),
    ("lifecycle", &[]),
    ("imds", &[]),
    // 70 agent starts, a minute and more under emulation, and a restart on another port: what the
    // kernel does there (hash map writes, a link update) the other tests do too.
    (
        "guard",
        &[
            "agents_that_fail_before_attaching_cannot_fill_the_exempt_set",
            "an_agent_restarted_on_another_port_guards_that_one_and_frees_the_old",
        ],
    ),
    // The flood tests the agent's connection limits, user space only, with thousands of connections
    // that take minutes under emulation.
    (
        "integrity",
        &["a_connection_flood_from_one_pod_does_not_starve_another"],
    ),
    // Those that fetch credentials from moto need Python, which the VMs do not have.
    (
        "kubernetes",
        &[
            "an_annotated_pod_gets_its_role_and_a_pod_sharing_its_network_never_does",
            "with_an_auto_discovered_base_arn_the_unannotated_pod_gets_the_default_role_only",
            "a_burst_of_first_requests_from_many_pods_of_one_role_makes_one_call_per_session",
        ],
    ),
    // The agent's image under containerd: its security context, the cgroup namespace containerd gives
    // it only on a cgroup v2 host (the VMs'), and each capability taken away, which depends on the
    // kernel. The rest (moto's credentials, the restarts' 1 s client timeouts, the uninstall container
    // and the squatter, whose kernel parts `lifecycle` and `guard` run here) stays on the host.
    (
        "runtime",
        &[
            "pods_made_through_cri_get_their_own_roles_credentials_from_the_agent_container",
            "agent_container_restarts_leave_no_window_and_no_misattribution",
            "the_uninstall_daemonsets_container_leaves_nothing_attached_or_pinned",
            "a_host_network_container_cannot_take_the_agents_ports_while_it_runs_or_after_it_crashed",
        ],
    ),
    // hostNetwork pods through the redirect in the node's own namespace; the tests with boto3, the
    // AWS CLI and the metrics parser need Python.
    (
        "node_daemons",
        &[
            "node_daemons_keep_their_paths_and_credentials_through_install_and_restarts_and_no_pod_gets_a_secret",
            "the_pods_given_the_nodes_credentials_are_counted_logged_once_and_listed_by_status",
        ],
    ),
];

/// A test executable and the tests to skip in it.
struct KernelTest {
    executable: PathBuf,
    skip: &'static [&'static str],
}

/// Builds the agent and the privileged tests and returns the kernel tests' executables.
fn build_test_binaries() -> Result<Vec<KernelTest>> {
    build_ebpf::build_all_targets()?;
    // The host suite's own selection, so nothing is built twice.
    let out = workspace_cargo()
        .args(["test", "--all-targets", "--no-run", "--message-format=json"])
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let executables: Vec<KernelTest> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["kind"] == serde_json::json!(["test"]))
        .filter_map(|message| {
            let (_, skip) = KERNEL_TESTS
                .iter()
                .find(|(name, _)| message["target"]["name"] == *name)?;
            let executable = PathBuf::from(message["executable"].as_str()?);
            Some(KernelTest { executable, skip })
        })
        .collect();
    if executables.len() != KERNEL_TESTS.len() {
        bail!(
            "cargo built {} of the {} kernel tests for the VMs",
            executables.len(),
            KERNEL_TESTS.len()
        );
    }
    Ok(executables)
}

/// Boots `release` and runs every test executable in it; `Ok(false)` when a test failed.
fn run_in_vm(
    venv: &Path,
    release: &str,
    tests: &[KernelTest],
    agent_image: Option<(&str, &Path)>,
) -> Result<bool> {
    let shared = workspace_root().join("target/vm").join(release);
    fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;
    let script = shared.join("run.sh");
    fs::write(&script, guest_script(tests, agent_image)).context("cannot write the guest script")?;
    println!("\nxtask: booting {release} (no KVM here: about a minute)");
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut vm = Command::new("timeout")
        .arg(VM_TIMEOUT_SECONDS.to_string())
        .arg(venv.join("bin/vng"))
        .args(["--run", &format!("/boot/vmlinuz-{release}")])
        .args(["--memory", "2G", "--cpus", "2", "--disable-kvm", "--force-9p"])
        // The guest kernel's warnings, oopses and panics reach the output (its boot messages do
        // not): a VM that stops before its tests finish says why.
        .args(["--verbose", "--append", "loglevel=4"])
        .arg("--rwdir")
        .arg(&shared)
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        // vng runs `virtme-run` from PATH.
        .env("PATH", path)
        // qemu reopens a console file it inherits, truncating it: a caller's log file would lose
        // everything printed before the VM. Pipes cannot be truncated, so the output is relayed.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run vng")?;
    let (mut out, mut err) = (vm.stdout.take().expect("piped"), vm.stderr.take().expect("piped"));
    let relay_err = std::thread::spawn(move || io::copy(&mut err, &mut io::stderr()));
    io::copy(&mut out, &mut io::stdout()).context("cannot relay the VM's output")?;
    let relayed = relay_err
        .join()
        .map_err(|_| anyhow::anyhow!("the stderr relay panicked"))?;
    relayed.context("cannot relay the VM's errors")?;
    Ok(vm.wait().context("cannot wait for vng")?.success())
}

fn guest_script(tests: &[KernelTest], agent_image: Option<(&str, &Path)>) -> String {
    let mut script = String::from(
        "# Written by cargo xtask test: the privileged tests inside the VM.\n\
         echo \"guest kernel $(uname -r), cgroup2 at $(awk '$9 == \"cgroup2\" {print $5}' /proc/self/mountinfo)\"\n\
         export CI=true\nfailed=0\n",
    );
    if let Some((var, image)) = agent_image {
        script.push_str(&format!("export {var}='{}'\n", image.display()));
    }
    for test in tests {
        let skips: String = test.skip.iter().map(|name| format!(" --skip '{name}'")).collect();
        script.push_str(&format!(
            "'{}' --test-threads=2{skips} || failed=1\n",
            test.executable.display()
        ));
    }
    script.push_str("exit $failed\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_match_their_series_only() {
        let [v61, v612] = &MATRIX;
        assert!(package_matches(v61, "linux-image-6.1.0-50-amd64-unsigned"));
        assert!(!package_matches(v61, "linux-image-6.1.0-50-cloud-amd64-unsigned"));
        assert!(!package_matches(v61, "linux-image-6.12.107+deb12-amd64-unsigned"));
        assert!(package_matches(v612, "linux-image-6.12.107+deb12-amd64-unsigned"));
        assert!(!package_matches(
            v612,
            "linux-image-6.12.107+deb12-rt-amd64-unsigned"
        ));
    }

    #[test]
    fn pinned_releases_belong_to_their_series() {
        for series in &MATRIX {
            assert!(package_matches(
                series,
                &format!("linux-image-{}-unsigned", series.pinned)
            ));
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_key("linux-image-6.1.0-100-amd64") > version_key("linux-image-6.1.0-50-amd64"));
    }
}
