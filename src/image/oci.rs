//! OCI image layouts (a directory, or a tar of one): `index.json` picks a
//! manifest, whose layers are applied in order with their whiteouts. Every
//! blob read is checked against its sha256 digest and size; JSON documents
//! are read with a size cap.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::extract::Extractor;
use super::{decompress, ImageError, OciConfig, Progress};
use crate::runtime::sys;

/// Largest JSON document (index, manifest, config) read.
const JSON_LIMIT: u64 = 4 << 20;
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Where the files of a layout come from.
pub(crate) enum Layout {
    Dir(OwnedFd),
    /// A tar of a layout: each member's data offset and size.
    Tar {
        file: File,
        members: HashMap<String, (u64, u64)>,
    },
}

impl Layout {
    /// Indexes the members of an uncompressed tar (headers only).
    pub(crate) fn tar(file: File) -> Result<Self, ImageError> {
        let mut members = HashMap::new();
        {
            let mut archive = tar::Archive::new(&file);
            let entries = archive
                .entries_with_seek()
                .map_err(|e| ImageError::Archive(format!("reading the tar: {e}")))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| ImageError::Archive(format!("reading the tar: {e}")))?;
                if entry.header().entry_type() != tar::EntryType::Regular {
                    continue;
                }
                let Ok(path) = entry.path() else { continue };
                let Ok(path) = super::extract::tree_path(&path) else {
                    continue;
                };
                members.insert(
                    path.to_string_lossy().into_owned(),
                    (entry.raw_file_position(), entry.size()),
                );
            }
        }
        Ok(Layout::Tar { file, members })
    }

    /// Whether this looks like an OCI image layout.
    pub(crate) fn is_layout(&self) -> bool {
        match self {
            Layout::Dir(_) => true,
            Layout::Tar { members, .. } => {
                members.contains_key("oci-layout") && members.contains_key("index.json")
            }
        }
    }

    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let missing =
            |e: io::Error| ImageError::Oci(format!("the OCI layout has no readable {path}: {e}"));
        match self {
            Layout::Dir(dir) => {
                let fd = sys::open_in_root(dir.as_fd(), Path::new(path), libc::O_RDONLY)
                    .map_err(missing)?;
                let file = File::from(fd);
                let meta = file.metadata().map_err(missing)?;
                if !meta.is_file() {
                    return Err(ImageError::Oci(format!(
                        "{path} in the OCI layout is not a regular file"
                    )));
                }
                Ok((Box::new(file), meta.len()))
            }
            Layout::Tar { file, members } => {
                let (offset, size) = *members
                    .get(path)
                    .ok_or_else(|| ImageError::Oci(format!("the OCI archive has no {path}")))?;
                let mut file = file.try_clone().map_err(missing)?;
                file.seek(SeekFrom::Start(offset)).map_err(missing)?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        expect: Option<&Descriptor>,
    ) -> Result<T, ImageError> {
        let (reader, size) = self.open(path)?;
        if size > JSON_LIMIT {
            return Err(ImageError::Oci(format!(
                "{path} is {size} bytes, more than the {JSON_LIMIT} a JSON document may have"
            )));
        }
        let mut data = Vec::new();
        reader
            .take(JSON_LIMIT)
            .read_to_end(&mut data)
            .map_err(|e| ImageError::Oci(format!("reading {path}: {e}")))?;
        if let Some(descriptor) = expect {
            check_digest(descriptor, &Sha256::digest(&data).into(), data.len() as u64)?;
        }
        serde_json::from_slice(&data).map_err(|e| ImageError::Oci(format!("{path}: {e}")))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayoutFile {
    image_layout_version: String,
}

/// `blobs/sha256/HEX` for a `sha256:HEX` digest; other algorithms and
/// malformed digests are refused.
fn blob_path(digest: &str) -> Result<String, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
        .ok_or_else(|| {
            ImageError::Oci(format!(
                "unsupported or malformed digest {digest:?} (only sha256 is supported)"
            ))
        })?;
    Ok(format!("blobs/sha256/{hex}"))
}

fn check_digest(descriptor: &Descriptor, sha: &[u8; 32], size: u64) -> Result<(), ImageError> {
    let actual: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    if descriptor.digest != format!("sha256:{actual}") {
        return Err(ImageError::Oci(format!(
            "blob {} does not match its digest (its content hashes to sha256:{actual}); the layout is corrupt",
            descriptor.digest
        )));
    }
    if descriptor.size != size {
        return Err(ImageError::Oci(format!(
            "blob {} is {size} bytes, its descriptor says {}",
            descriptor.digest, descriptor.size
        )));
    }
    Ok(())
}

/// Hashes and counts what passes through.
struct Verified<'a, R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    done: &'a AtomicU64,
}

impl<R: Read> Read for Verified<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Picks the manifest: the one tagged `reference`, or the only one.
fn pick<'a>(
    manifests: &'a [Descriptor],
    reference: Option<&str>,
) -> Result<&'a Descriptor, ImageError> {
    let tags: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m.annotations.get(REF_ANNOTATION).map(String::as_str))
        .collect();
    match reference {
        Some(reference) => manifests
            .iter()
            .find(|m| m.annotations.get(REF_ANNOTATION).map(String::as_str) == Some(reference))
            .ok_or_else(|| {
                ImageError::Oci(format!(
                    "the OCI layout has no manifest tagged {reference:?} (tags: {})",
                    if tags.is_empty() {
                        "none".to_owned()
                    } else {
                        tags.join(", ")
                    }
                ))
            }),
        None => match manifests {
            [one] => Ok(one),
            [] => Err(ImageError::Oci(
                "the OCI layout's index.json lists no manifest".into(),
            )),
            _ => Err(ImageError::Oci(format!(
                "the OCI layout holds {} manifests; pick one with --ref (tags: {})",
                manifests.len(),
                if tags.is_empty() {
                    "none".to_owned()
                } else {
                    tags.join(", ")
                }
            ))),
        },
    }
}

/// Applies the picked manifest's layers to `extractor`; returns the image's
/// runtime defaults and the reference picked.
pub(crate) fn import_layout(
    layout: &Layout,
    reference: Option<&str>,
    extractor: &mut Extractor,
    progress: &Progress,
) -> Result<(OciConfig, String), ImageError> {
    let marker: OciLayoutFile = layout.read_json("oci-layout", None)?;
    if !marker.image_layout_version.starts_with("1.") {
        return Err(ImageError::Oci(format!(
            "unsupported OCI image layout version {:?}",
            marker.image_layout_version
        )));
    }
    let index: Index = layout.read_json("index.json", None)?;
    let mut descriptor = pick(&index.manifests, reference)?.clone();
    let tag = descriptor
        .annotations
        .get(REF_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    // A multi-platform index: the manifest for this host.
    for _ in 0..4 {
        if !descriptor.media_type.ends_with("image.index.v1+json")
            && !descriptor.media_type.ends_with("manifest.list.v2+json")
        {
            break;
        }
        let nested: Index = layout.read_json(&blob_path(&descriptor.digest)?, Some(&descriptor))?;
        let arch = host_architecture();
        descriptor = nested
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .cloned()
            .ok_or_else(|| {
                ImageError::Oci(format!("the OCI index has no manifest for linux/{arch}"))
            })?;
    }
    let manifest: Manifest =
        layout.read_json(&blob_path(&descriptor.digest)?, Some(&descriptor))?;
    let config: ConfigFile =
        layout.read_json(&blob_path(&manifest.config.digest)?, Some(&manifest.config))?;
    progress.total.store(
        manifest.layers.iter().map(|l| l.size).sum(),
        Ordering::Relaxed,
    );
    for layer in &manifest.layers {
        let path = blob_path(&layer.digest)?;
        let (raw, _) = layout.open(&path)?;
        let mut verified = Verified {
            inner: raw,
            hasher: Sha256::new(),
            count: 0,
            done: &progress.done,
        };
        {
            let mut decoded = decompress(&mut verified)
                .map_err(|e| ImageError::Oci(format!("layer {}: {e}", layer.digest)))?;
            extractor.apply(&mut decoded, true).map_err(|e| match e {
                ImageError::Archive(message) => {
                    ImageError::Archive(format!("layer {}: {message}", layer.digest))
                }
                other => other,
            })?;
            io::copy(&mut decoded, &mut io::sink())
                .map_err(|e| ImageError::Oci(format!("layer {}: {e}", layer.digest)))?;
        }
        io::copy(&mut verified, &mut io::sink())
            .map_err(|e| ImageError::Oci(format!("layer {}: {e}", layer.digest)))?;
        let sha: [u8; 32] = verified.hasher.finalize().into();
        check_digest(layer, &sha, verified.count)?;
    }
    let raw = config.config.unwrap_or_default();
    Ok((
        OciConfig {
            env: raw.env.unwrap_or_default(),
            entrypoint: raw.entrypoint.unwrap_or_default(),
            cmd: raw.cmd.unwrap_or_default(),
            working_dir: raw.working_dir.unwrap_or_default(),
            user: raw.user.unwrap_or_default(),
        },
        tag,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(tag: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            annotations: tag
                .map(|t| HashMap::from([(REF_ANNOTATION.to_owned(), t.to_owned())]))
                .unwrap_or_default(),
            platform: None,
        }
    }

    #[test]
    fn blob_paths_refuse_bad_digests() {
        assert_eq!(
            blob_path(&format!("sha256:{}", "0f".repeat(32))).unwrap(),
            format!("blobs/sha256/{}", "0f".repeat(32))
        );
        assert!(blob_path("sha256:../../etc/passwd").is_err());
        assert!(blob_path(&format!("sha512:{}", "a".repeat(128))).is_err());
        assert!(blob_path(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn picks_by_reference_or_the_only_one() {
        let one = [descriptor(Some("v1"))];
        assert!(pick(&one, None).is_ok());
        let two = [descriptor(Some("v1")), descriptor(Some("v2"))];
        let err = pick(&two, None).unwrap_err().to_string();
        assert!(err.contains("--ref") && err.contains("v2"), "{err}");
        assert_eq!(
            pick(&two, Some("v2")).unwrap().annotations[REF_ANNOTATION],
            "v2"
        );
        assert!(pick(&two, Some("v3")).is_err());
    }

    #[test]
    fn digests_are_checked() {
        let data = b"hello";
        let sha: [u8; 32] = Sha256::digest(data).into();
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        let mut d = descriptor(None);
        d.digest = format!("sha256:{hex}");
        d.size = 5;
        assert!(check_digest(&d, &sha, 5).is_ok());
        assert!(check_digest(&d, &sha, 6).is_err());
        d.digest = format!("sha256:{}", "0".repeat(64));
        assert!(check_digest(&d, &sha, 5).is_err());
    }
}
