//! The image check (`cargo xtask image --check`, and `cargo xtask test`'s on a dev build): builds the
//! image as `cargo xtask image` does, reads it back
//! with skopeo (an implementation of the image spec independent of the code that wrote it) and checks
//! its digest, platform, entrypoint and labels (and that `deploy/Dockerfile` sets the same labels),
//! then unpacks its layer and runs the agent from the unpacked root with `--version` (in a chroot when
//! root, which proves the binary needs no file the image lacks). Without skopeo, which xtask installs
//! from Debian when missing, the check is skipped; with `CI` set it fails instead.

use std::{
    collections::BTreeMap,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::{
    build_ebpf::workspace_root,
    image::{self, Built, ENTRYPOINT},
    install::{ensure_commands, output, run_checked},
};

/// skopeo reads the layout; tar unpacks the layer it copies out.
const CHECK_COMMANDS: &[(&str, &str)] = &[("skopeo", "skopeo"), ("tar", "tar")];

/// Builds the image from a `profile` build of the agent and checks it; returns its `oci-archive`, or
/// `None` when the check was skipped.
pub fn run(profile: &str) -> Result<Option<PathBuf>> {
    if let Err(err) = ensure_commands(CHECK_COMMANDS) {
        if env::var_os("CI").is_some() {
            return Err(err.context("the image check needs skopeo"));
        }
        println!("xtask: SKIPPING the image check: cannot install skopeo ({err:#})");
        return Ok(None);
    }
    let started = Instant::now();
    let built = image::build(profile)?;
    check_metadata(&built)?;
    check_dockerfile_labels(&built.labels)?;
    let scratch = workspace_root().join("target/image/check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    let root = unpack(&built, &scratch)?;
    check_version(&root, &built.tag)?;
    // Kept when a step fails, to look at; removed when all passed.
    fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    println!("xtask: image check passed in {:.0?}", started.elapsed());
    Ok(Some(built.archive))
}

/// skopeo's view of the image: the digest xtask printed, linux/amd64, the entrypoint and the labels.
fn check_metadata(built: &Built) -> Result<()> {
    let inspect = skopeo_json(&["inspect", &built.reference()])?;
    ensure!(
        inspect["Digest"] == json!(built.digest),
        "skopeo reads digest {} from the layout, xtask printed {}",
        inspect["Digest"],
        built.digest
    );
    ensure!(
        (&inspect["Os"], &inspect["Architecture"]) == (&json!("linux"), &json!("amd64")),
        "the image is for {}/{}, not linux/amd64",
        inspect["Os"],
        inspect["Architecture"]
    );
    ensure!(
        inspect["Labels"] == json!(built.labels),
        "the image's labels are {}, expected {:?}",
        inspect["Labels"],
        built.labels
    );
    let config = skopeo_json(&["inspect", "--config", &built.reference()])?;
    ensure!(
        config["config"]["Entrypoint"] == json!(ENTRYPOINT),
        "the image's entrypoint is {}, expected {ENTRYPOINT:?}",
        config["config"]["Entrypoint"]
    );
    Ok(())
}

fn skopeo_json(args: &[&str]) -> Result<Value> {
    let out = output(Command::new("skopeo").args(args))
        .with_context(|| format!("`skopeo {}` failed", args.join(" ")))?;
    serde_json::from_str(&out).with_context(|| format!("`skopeo {}` printed no JSON", args.join(" ")))
}

/// The Dockerfile's image must carry the labels of the image xtask builds (a new version, say).
fn check_dockerfile_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    let path = workspace_root().join("deploy/Dockerfile");
    let dockerfile = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let in_dockerfile = dockerfile_labels(&dockerfile);
    ensure!(
        &in_dockerfile == labels,
        "{} labels the image {in_dockerfile:?}; `cargo xtask image` labels it {labels:?}: update the Dockerfile",
        path.display()
    );
    Ok(())
}

/// The `org.opencontainers.image.*` labels of a Dockerfile's `LABEL` instruction, one `key="value"`
/// a line.
fn dockerfile_labels(dockerfile: &str) -> BTreeMap<String, String> {
    dockerfile
        .lines()
        .filter_map(|line| {
            let line = line
                .trim()
                .trim_start_matches("LABEL")
                .trim_end_matches('\\')
                .trim();
            let (key, value) = line.split_once('=')?;
            key.starts_with("org.opencontainers.image.")
                .then(|| (key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

/// Copies the image out of the layout with skopeo (which verifies every blob's digest) and unpacks its
/// layer into `scratch/rootfs`, which it returns.
fn unpack(built: &Built, scratch: &Path) -> Result<PathBuf> {
    let copy = scratch.join("copy");
    let root = scratch.join("rootfs");
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    run_checked(
        Command::new("skopeo")
            // A copy between two local directories: no signature policy to apply.
            .args(["--insecure-policy", "copy", "--quiet", &built.reference()])
            .arg(format!("dir:{}", copy.display())),
    )?;
    let manifest_path = copy.join("manifest.json");
    let manifest: Value = serde_json::from_slice(
        &fs::read(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?,
    )
    .context("skopeo's copy has no manifest")?;
    let layers = manifest["layers"]
        .as_array()
        .context("the manifest lists no layers")?;
    ensure!(
        layers.len() == 1,
        "the image has {} layers, expected one",
        layers.len()
    );
    let digest = layers[0]["digest"].as_str().context("the layer has no digest")?;
    let layer = copy.join(digest.trim_start_matches("sha256:"));
    run_checked(Command::new("tar").arg("-xzf").arg(&layer).arg("-C").arg(&root))?;
    Ok(root)
}

/// The PATH containerd's CRI plugin (and CRI-O) gives a container whose image sets none: `kubectl
/// exec ds/interceptor -- interceptor status` resolves the name with it.
const RUNTIME_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the agent with `--version` from the unpacked root, by each name a user gives it: the
/// entrypoint, the bare name on the runtime's default PATH, and the earlier images' `/interceptor`. In
/// a chroot as root, where only the image's files exist; else the binary straight from its path.
fn check_version(root: &Path, tag: &str) -> Result<()> {
    let as_root = output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0");
    if !as_root {
        println!("xtask: not root: running the image's agent outside a chroot");
        return check_prints_version(Command::new(root.join(image::BINARY)), tag);
    }
    for name in [ENTRYPOINT[0], "interceptor", "/interceptor"] {
        let mut chroot = Command::new("chroot");
        chroot.env("PATH", RUNTIME_DEFAULT_PATH).arg(root).arg(name);
        check_prints_version(chroot, tag)?;
    }
    Ok(())
}

fn check_prints_version(mut command: Command, tag: &str) -> Result<()> {
    command.arg("--version");
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && version.trim() == format!("interceptor {tag}"),
        "{command:?} ({}) printed {version:?}, expected \"interceptor {tag}\"; its stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_labels_of_a_dockerfile() {
        let dockerfile = "FROM scratch\n\
                          LABEL org.opencontainers.image.title=\"interceptor\" \\\n      \
                          org.opencontainers.image.version=\"1.2.3\"\n\
                          ENV A=b\n\
                          ENTRYPOINT [\"/usr/local/bin/interceptor\"]\n";
        assert_eq!(
            dockerfile_labels(dockerfile),
            BTreeMap::from([
                (
                    "org.opencontainers.image.title".to_owned(),
                    "interceptor".to_owned()
                ),
                ("org.opencontainers.image.version".to_owned(), "1.2.3".to_owned()),
            ])
        );
    }
}
