//! Small single-layer OCI archives (`oci-archive`: an image layout in one tarball) made from files of
//! this machine, for the tests' containerd to import without a registry. The layer is an uncompressed
//! tarball; the manifest is named by the `org.opencontainers.image.ref.name` annotation, which
//! `ctr images import --base-name` turns into `<base name>:<tag>`. The agent's image comes from
//! `cargo xtask image` instead.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Debian's static busybox (package busybox-static): one file that runs `sleep`, `sh` and the rest.
pub const BUSYBOX: &str = "/bin/busybox";

/// A file of the image: where it goes and where its bytes come from on this machine.
pub struct ImageFile<'a> {
    pub path_in_image: &'a str,
    pub source: &'a Path,
    pub mode: u32,
}

/// Writes an archive at `archive` holding `files` (their parent directories are added), with
/// `entrypoint` and the tag `tag`.
pub fn write(archive: &Path, tag: &str, files: &[ImageFile], entrypoint: &[&str]) -> Result<()> {
    let layer = layer_tarball(files)?;
    let layer_digest = sha256_digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))?;
    let mut manifest_descriptor = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;

    let mut out = tar::Builder::new(Vec::new());
    append_dir(&mut out, "blobs/")?;
    append_dir(&mut out, "blobs/sha256/")?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", hex_sha256(blob));
        append_file(&mut out, &name, 0o644, blob)?;
    }
    append_file(&mut out, "index.json", 0o644, &index)?;
    append_file(
        &mut out,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let bytes = out.into_inner().context("cannot finish the OCI archive")?;
    fs::write(archive, bytes).with_context(|| format!("cannot write {}", archive.display()))
}

/// An image whose entrypoint sleeps forever: what a pause container does, and a workload that only
/// needs to be there. Busybox is at `/bin/busybox`.
pub fn write_sleeper(archive: &Path, tag: &str) -> Result<()> {
    let busybox = ImageFile {
        path_in_image: "bin/busybox",
        source: Path::new(BUSYBOX),
        mode: 0o755,
    };
    write(archive, tag, &[busybox], &["/bin/busybox", "sleep", "infinity"])
}

/// A workload image: busybox (the entrypoint sleeps, as [`write_sleeper`]'s) and `sim-client` at
/// `/bin/sim-client` (stripped, from `sim_client`) with the glibc files it loads, so a container runs
/// the tests' own metadata client.
pub fn write_workload(archive: &Path, tag: &str, sim_client: &Path) -> Result<()> {
    let stripped = archive.with_extension("sim-client");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(sim_client)
        .status()
        .context("cannot run strip (binutils)")?;
    anyhow::ensure!(
        status.success(),
        "strip {} failed: {status}",
        sim_client.display()
    );
    let mut files = vec![
        ImageFile {
            path_in_image: "bin/busybox",
            source: Path::new(BUSYBOX),
            mode: 0o755,
        },
        ImageFile {
            path_in_image: "bin/sim-client",
            source: &stripped,
            mode: 0o755,
        },
    ];
    files.extend(GLIBC_FILES.iter().map(|(path_in_image, source)| ImageFile {
        path_in_image,
        source: Path::new(source),
        mode: 0o755,
    }));
    write(archive, tag, &files, &["/bin/busybox", "sleep", "infinity"])
}

/// What a Rust binary linked against this machine's glibc loads: the loader (at the path its ELF
/// header names), libc, libm and libgcc_s (where the loader looks by default).
const GLIBC_FILES: &[(&str, &str)] = &[
    ("lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
    (
        "lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
    ),
    (
        "lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libm.so.6",
    ),
    (
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
    ),
];

fn layer_tarball(files: &[ImageFile]) -> Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut dirs_written: Vec<String> = Vec::new();
    for file in files {
        let mut dir = String::new();
        let components: Vec<&str> = file.path_in_image.split('/').collect();
        for component in &components[..components.len() - 1] {
            dir.push_str(component);
            dir.push('/');
            if !dirs_written.contains(&dir) {
                append_dir(&mut layer, &dir)?;
                dirs_written.push(dir.clone());
            }
        }
        let contents =
            fs::read(file.source).with_context(|| format!("cannot read {}", file.source.display()))?;
        append_file(&mut layer, file.path_in_image, file.mode, &contents)?;
    }
    layer.into_inner().context("cannot finish the layer tarball")
}

fn append_dir(out: &mut tar::Builder<Vec<u8>>, path: &str) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_mtime(0);
    out.append_data(&mut header, path, std::io::empty())
        .with_context(|| format!("cannot add {path} to a tarball"))
}

fn append_file(out: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, contents: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(mode);
    header.set_size(contents.len() as u64);
    header.set_mtime(0);
    out.append_data(&mut header, path, contents)
        .with_context(|| format!("cannot add {path} to a tarball"))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_digest(bytes), "size": bytes.len()})
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(bytes))
}
