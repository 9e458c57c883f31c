//! A single-layer OCI image (image-spec v1.1) written as an image layout and as an `oci-archive` (the
//! same layout in one tarball): the gzipped layer tarball, the config, the manifest, `index.json` and
//! `oci-layout`, every blob named by its sha256. The bytes depend on nothing but the inputs (fixed
//! mtimes and owners in the tarballs, no creation time, JSON with sorted keys, a gzip header without
//! a time), so the same files give the same digests (with the same flate2, which Cargo.lock pins).

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context, Result};
use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The annotation that names a manifest of a layout: the `TAG` of `oci:DIR:TAG`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The time of every file in the tarballs: a fixed one keeps the digests reproducible.
const MTIME: u64 = 0;

/// One entry of a tarball, in the order it is written (a directory before what it holds).
pub enum Entry<'a> {
    Dir {
        path: &'a str,
        mode: u32,
    },
    File {
        path: &'a str,
        mode: u32,
        contents: &'a [u8],
    },
    /// A symbolic link at `path` to `target` (relative, so it resolves inside any root).
    Symlink {
        path: &'a str,
        target: &'a str,
    },
}

/// What the image's config holds besides its layer.
pub struct Config<'a> {
    /// GOARCH's name of the binaries' architecture (`amd64`); the OS is always `linux`.
    pub architecture: &'a str,
    pub entrypoint: &'a [&'a str],
    pub labels: &'a BTreeMap<String, String>,
}

/// A blob of the layout with its media type.
struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
}

impl Blob {
    fn json(media_type: &'static str, value: &Value) -> Result<Self> {
        let bytes = serde_json::to_vec(value).context("cannot serialise an OCI document")?;
        Ok(Self { media_type, bytes })
    }

    fn digest(&self) -> String {
        sha256_digest(&self.bytes)
    }

    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// A built image: its blobs, ready to be written as a layout or an archive.
pub struct Image {
    layer: Blob,
    config: Blob,
    manifest: Blob,
    platform: Value,
    /// The size of the layer before compression: what the root filesystem takes on a node.
    unpacked_size: usize,
}

impl Image {
    pub fn new(entries: &[Entry], config: &Config) -> Result<Self> {
        let layer_tar = tarball(entries)?;
        let layer = Blob {
            media_type: LAYER_MEDIA_TYPE,
            bytes: gzip(&layer_tar)?,
        };
        let config_blob = Blob::json(
            CONFIG_MEDIA_TYPE,
            &json!({
                "architecture": config.architecture,
                "os": "linux",
                "config": {"Entrypoint": config.entrypoint, "Labels": config.labels},
                // The layer's digest before compression (its "diff id").
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&layer_tar)]},
            }),
        )?;
        let manifest = Blob::json(
            MANIFEST_MEDIA_TYPE,
            &json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": config_blob.descriptor(),
                "layers": [layer.descriptor()],
            }),
        )?;
        Ok(Self {
            layer,
            config: config_blob,
            manifest,
            platform: json!({"architecture": config.architecture, "os": "linux"}),
            unpacked_size: layer_tar.len(),
        })
    }

    /// The image's digest: its manifest's, as registries, skopeo and `podman images --digests` show it.
    pub fn digest(&self) -> String {
        self.manifest.digest()
    }

    /// What a pull transfers: the compressed layer, the config and the manifest.
    pub fn compressed_size(&self) -> usize {
        [&self.layer, &self.config, &self.manifest]
            .iter()
            .map(|blob| blob.bytes.len())
            .sum()
    }

    pub fn unpacked_size(&self) -> usize {
        self.unpacked_size
    }

    /// Writes the image layout into `dir` (replaced: blobs of an older build would linger), with the
    /// manifest named `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        for (path, bytes) in self.layout_files(tag)? {
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes the same layout as one tarball (`oci-archive:FILE:TAG`, which `podman load` reads).
    pub fn write_archive(&self, file: &Path, tag: &str) -> Result<()> {
        let files = self.layout_files(tag)?;
        let mut entries = vec![
            Entry::Dir {
                path: "blobs/",
                mode: 0o755,
            },
            Entry::Dir {
                path: "blobs/sha256/",
                mode: 0o755,
            },
        ];
        entries.extend(files.iter().map(|(path, bytes)| Entry::File {
            path: path.as_str(),
            mode: 0o644,
            contents: bytes.as_slice(),
        }));
        fs::write(file, tarball(&entries)?).with_context(|| format!("cannot write {}", file.display()))
    }

    /// Every file of the layout, by its path from the layout's root.
    fn layout_files(&self, tag: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let mut manifest_descriptor = self.manifest.descriptor();
        manifest_descriptor["platform"] = self.platform.clone();
        manifest_descriptor["annotations"] = json!({ REF_NAME: tag });
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [manifest_descriptor],
        });
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                serde_json::to_vec(&json!({"imageLayoutVersion": "1.0.0"}))?,
            ),
            ("index.json".to_owned(), serde_json::to_vec(&index)?),
        ];
        for blob in [&self.layer, &self.config, &self.manifest] {
            let hex = blob.digest().trim_start_matches("sha256:").to_owned();
            files.push((format!("blobs/sha256/{hex}"), blob.bytes.clone()));
        }
        Ok(files)
    }
}

/// `sha256:<hex>`, the form of every digest in the image.
fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// A tarball of `entries`, owned by root, with fixed times.
fn tarball(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (path, mode, contents, kind) = match *entry {
            Entry::Dir { path, mode } => (path, mode, &[][..], EntryType::Directory),
            Entry::File { path, mode, contents } => (path, mode, contents, EntryType::Regular),
            Entry::Symlink { path, .. } => (path, 0o777, &[][..], EntryType::Symlink),
        };
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(contents.len() as u64);
        header.set_mtime(MTIME);
        header.set_uid(0);
        header.set_gid(0);
        let added = match *entry {
            Entry::Symlink { path, target } => builder.append_link(&mut header, path, target),
            _ => builder.append_data(&mut header, path, contents),
        };
        added.with_context(|| format!("cannot add {path} to a tarball"))?;
    }
    builder.into_inner().context("cannot finish a tarball")
}

/// gzip with no file name and a zero time in its header, so equal input gives equal output.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    std::io::Write::write_all(&mut encoder, bytes).context("cannot compress the layer")?;
    encoder.finish().context("cannot compress the layer")
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn sample(binary: &[u8]) -> Image {
        let labels = BTreeMap::from([("org.opencontainers.image.version".to_owned(), "1.2.3".to_owned())]);
        let entries = [
            Entry::Dir {
                path: "etc/",
                mode: 0o755,
            },
            Entry::File {
                path: "etc/motd",
                mode: 0o644,
                contents: b"hi\n",
            },
            Entry::File {
                path: "app",
                mode: 0o755,
                contents: binary,
            },
            Entry::Symlink {
                path: "bin-app",
                target: "app",
            },
        ];
        let config = Config {
            architecture: "amd64",
            entrypoint: &["/app"],
            labels: &labels,
        };
        Image::new(&entries, &config).unwrap()
    }

    #[test]
    fn the_same_files_give_the_same_digest_and_another_binary_another() {
        assert_eq!(sample(b"binary").digest(), sample(b"binary").digest());
        assert_ne!(sample(b"binary").digest(), sample(b"other").digest());
    }

    #[test]
    fn the_layer_holds_the_entries_in_order_owned_by_root_with_a_fixed_time() {
        let image = sample(b"binary");
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&image.layer.bytes[..])
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(unpacked.len(), image.unpacked_size());
        let mut archive = tar::Archive::new(&unpacked[..]);
        let entries: Vec<(String, u32, u64, u64, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                let header = entry.unwrap().header().clone();
                let path = header.path().unwrap().to_string_lossy().into_owned();
                let link = header
                    .link_name()
                    .unwrap()
                    .map(|target| target.to_string_lossy().into_owned());
                (
                    path,
                    header.mode().unwrap(),
                    header.mtime().unwrap(),
                    header.uid().unwrap(),
                    link,
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("etc/".to_owned(), 0o755, MTIME, 0, None),
                ("etc/motd".to_owned(), 0o644, MTIME, 0, None),
                ("app".to_owned(), 0o755, MTIME, 0, None),
                ("bin-app".to_owned(), 0o777, MTIME, 0, Some("app".to_owned())),
            ]
        );
    }

    #[test]
    fn the_config_names_the_uncompressed_layer_and_the_manifest_the_blobs() {
        let image = sample(b"binary");
        let config: Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/app"]));
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            "1.2.3"
        );
        assert_eq!(
            (&config["architecture"], &config["os"]),
            (&json!("amd64"), &json!("linux"))
        );
        let mut layer_tar = Vec::new();
        flate2::read::GzDecoder::new(&image.layer.bytes[..])
            .read_to_end(&mut layer_tar)
            .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], json!([sha256_digest(&layer_tar)]));

        let manifest: Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
        assert_eq!(manifest["config"]["digest"], json!(image.config.digest()));
        assert_eq!(manifest["layers"][0]["digest"], json!(image.layer.digest()));
        assert_eq!(manifest["layers"][0]["size"], json!(image.layer.bytes.len()));
    }

    #[test]
    fn the_index_names_the_manifest_by_tag_and_every_blob_is_named_by_its_digest() {
        let image = sample(b"binary");
        let files: BTreeMap<String, Vec<u8>> = image.layout_files("1.2.3").unwrap().into_iter().collect();
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["digest"], json!(image.digest()));
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME], "1.2.3");
        for (path, bytes) in files.iter().filter(|(path, _)| path.starts_with("blobs/")) {
            assert_eq!(
                path.trim_start_matches("blobs/sha256/"),
                &sha256_digest(bytes)[7..]
            );
        }
    }
}
