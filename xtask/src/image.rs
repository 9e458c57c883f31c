//! `cargo xtask image`: the agent's container image, tagged with the workspace version, as an OCI image
//! layout (`target/image/interceptor-oci`) and as the same layout in one `oci-archive` tarball
//! (`target/image/interceptor-oci.tar`). The image is `FROM scratch`: the static agent binary at
//! `/usr/local/bin/interceptor` (the entrypoint, and on the runtime's default PATH, so `kubectl exec
//! ds/interceptor -- interceptor status` finds it), `/interceptor` a link to it (the path of earlier
//! images, which manifests and runbooks name), Debian's CA bundle at `/etc/ssl/certs/ca-certificates.crt` (the AWS
//! SDK's and kube's rustls clients trust the platform's roots through rustls-native-certs, which reads
//! that file). `deploy/Dockerfile` runs this same command in its builder stage and copies those two
//! files.
//!
//! xtask writes the layout itself ([`crate::oci`]) instead of running buildah or podman: those need root
//! or user namespaces, a storage driver and a local image store, and they stamp creation times into the
//! image, so every build of the same binary would get another digest. Written here, the image needs
//! nothing but cargo, and its digest is a function of its two files: packaging the same binary again
//! gives the same digest, so a digest says what is inside.
//!
//! The binary is built for `x86_64-unknown-linux-musl`, which links statically by default and whose C
//! parts (aws-lc-sys, ring) compile with Debian's `musl-gcc`. musl's resolver is built in, where a
//! static glibc would need NSS modules at run time to resolve STS's and the API server's names.

use std::{collections::BTreeMap, fs, path::PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    build_ebpf::{self, workspace_cargo, workspace_root},
    image_check,
    install::{ensure_commands, ensure_rust_target, output, run_checked},
    oci::{Config, Entry, Image},
};

/// The target of the image's binary, and its architecture as images name it (GOARCH).
const TARGET: &str = "x86_64-unknown-linux-musl";
const ARCHITECTURE: &str = "amd64";

/// musl-gcc compiles the C parts of the dependencies for musl.
const IMAGE_COMMANDS: &[(&str, &str)] = &[("musl-gcc", "musl-tools")];

/// The host's CA bundle, copied into the image at the same path (where rustls-native-certs looks).
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// Where the image is written, from the workspace root.
const LAYOUT: &str = "target/image/interceptor-oci";
const ARCHIVE: &str = "target/image/interceptor-oci.tar";

/// Where the binary is: on the PATH containerd and CRI-O give a container whose image sets none.
pub const BINARY: &str = "usr/local/bin/interceptor";
/// The binary's path in earlier images, kept as a link to it.
const LEGACY_BINARY: &str = "interceptor";

/// `docker run IMAGE --version` and the chart's `args` go straight to the agent.
pub const ENTRYPOINT: &[&str] = &["/usr/local/bin/interceptor"];

/// The labels' `org.opencontainers.image.*` names, with the field of the agent's `cargo metadata`
/// each one is taken from.
const LABEL_FIELDS: &[(&str, &str)] = &[
    ("title", "name"),
    ("description", "description"),
    ("version", "version"),
    ("licenses", "license"),
    ("source", "repository"),
];

#[derive(clap::Args)]
pub struct Options {
    /// Then check the image as `cargo xtask test` does: read it back with skopeo, run its agent.
    #[arg(long)]
    check: bool,
    /// The cargo profile of the agent binary. `cargo xtask test` checks an image of a `dev` build,
    /// which builds cold in a fraction of the release build's time; the image to ship is `release`'s.
    #[arg(long, default_value = "release", hide = true)]
    profile: String,
}

/// A built image, as the check reads it back.
pub struct Built {
    pub layout: PathBuf,
    /// The same image as one `oci-archive` tarball.
    pub archive: PathBuf,
    pub tag: String,
    pub digest: String,
    pub labels: BTreeMap<String, String>,
}

impl Built {
    /// The image as skopeo names it: `oci:DIR:TAG`.
    pub fn reference(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }
}

pub fn run(options: &Options) -> Result<()> {
    if options.check {
        return image_check::run(&options.profile).map(drop);
    }
    build(&options.profile).map(drop)
}

/// Builds the BPF object, the static agent with it embedded, and the image; prints its digest and size.
pub fn build(profile: &str) -> Result<Built> {
    build_ebpf::run()?;
    let binary_path = build_static_agent(profile)?;
    let binary = fs::read(&binary_path).with_context(|| format!("cannot read {}", binary_path.display()))?;
    let ca_path = PathBuf::from("/").join(CA_BUNDLE);
    let ca_bundle = fs::read(&ca_path).with_context(|| {
        format!(
            "cannot read {}: install Debian's ca-certificates",
            ca_path.display()
        )
    })?;
    let labels = labels(&agent_package()?)?;
    let tag = labels["org.opencontainers.image.version"].clone();

    let entries = [
        Entry::Dir {
            path: "etc/",
            mode: 0o755,
        },
        Entry::Dir {
            path: "etc/ssl/",
            mode: 0o755,
        },
        Entry::Dir {
            path: "etc/ssl/certs/",
            mode: 0o755,
        },
        Entry::File {
            path: CA_BUNDLE,
            mode: 0o644,
            contents: &ca_bundle,
        },
        Entry::Dir {
            path: "usr/",
            mode: 0o755,
        },
        Entry::Dir {
            path: "usr/local/",
            mode: 0o755,
        },
        Entry::Dir {
            path: "usr/local/bin/",
            mode: 0o755,
        },
        Entry::File {
            path: BINARY,
            mode: 0o755,
            contents: &binary,
        },
        Entry::Symlink {
            path: LEGACY_BINARY,
            target: BINARY,
        },
    ];
    let config = Config {
        architecture: ARCHITECTURE,
        entrypoint: ENTRYPOINT,
        labels: &labels,
    };
    let image = Image::new(&entries, &config)?;

    let layout = workspace_root().join(LAYOUT);
    let archive = workspace_root().join(ARCHIVE);
    image.write_layout(&layout, &tag)?;
    image.write_archive(&archive, &tag)?;
    println!(
        "xtask: image interceptor:{tag} ({profile} build), digest {}\n\
         xtask:   {} to pull, {} unpacked\n\
         xtask:   oci:{LAYOUT}:{tag}\n\
         xtask:   oci-archive:{ARCHIVE}:{tag}",
        image.digest(),
        megabytes(image.compressed_size()),
        megabytes(image.unpacked_size()),
    );
    Ok(Built {
        layout,
        archive,
        tag,
        digest: image.digest(),
        labels,
    })
}

/// Builds the agent for musl, installing the target and musl-gcc when missing; returns the binary.
fn build_static_agent(profile: &str) -> Result<PathBuf> {
    ensure_rust_target(TARGET)?;
    ensure_commands(IMAGE_COMMANDS)?;
    run_checked(workspace_cargo().args([
        "build",
        "--profile",
        profile,
        "--target",
        TARGET,
        "--package",
        "interceptor",
        "--bin",
        "interceptor",
    ]))?;
    Ok(workspace_root()
        .join("target")
        .join(TARGET)
        .join(profile_dir(profile))
        .join("interceptor"))
}

/// The directory of a profile's output: cargo names `dev`'s `debug`.
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" => "debug",
        other => other,
    }
}

/// The agent package's entry of `cargo metadata`.
fn agent_package() -> Result<Value> {
    let metadata = output(workspace_cargo().args(["metadata", "--format-version", "1", "--no-deps"]))
        .context("`cargo metadata` failed")?;
    let metadata: Value = serde_json::from_str(&metadata).context("`cargo metadata` printed no JSON")?;
    metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|package| package["name"] == "interceptor"))
        .cloned()
        .context("`cargo metadata` lists no interceptor package")
}

/// The image's `org.opencontainers.image.*` labels, from the agent package's metadata.
fn labels(package: &Value) -> Result<BTreeMap<String, String>> {
    LABEL_FIELDS
        .iter()
        .map(|(label, field)| {
            let value = package[field]
                .as_str()
                .with_context(|| format!("the interceptor package has no {field}"))?;
            Ok((format!("org.opencontainers.image.{label}"), value.to_owned()))
        })
        .collect()
}

fn megabytes(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn labels_come_from_the_package_metadata() {
        let package = json!({
            "name": "interceptor",
            "description": "Per-pod roles",
            "version": "1.2.3",
            "license": "Apache-2.0",
            "repository": "https://example.com/interceptor",
        });
        let labels = labels(&package).unwrap();
        assert_eq!(labels["org.opencontainers.image.version"], "1.2.3");
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://example.com/interceptor"
        );
        assert_eq!(labels.len(), LABEL_FIELDS.len());
        assert!(super::labels(&json!({"name": "interceptor"})).is_err());
    }

    #[test]
    fn the_dev_profile_builds_into_debug() {
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
    }
}
