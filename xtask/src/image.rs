//! `cargo xtask image [--check] [--verify-reproducible]`: OCI image
//! archives of the two binaries, assembled here without a container engine.
//!
//! Each image is one layer: the statically linked, stripped release binary
//! at `/usr/local/bin/<name>` (built with `-p`, so no test-kit feature can
//! leak in), plus CA certificates for the labeller and a minimal
//! `/etc/hosts` and `/etc/passwd`. Assembly is deterministic: entries in a
//! fixed order, owner 0:0, fixed modes, timestamps from `SOURCE_DATE_EPOCH`
//! (0 when unset), gzip without a timestamp — the same binaries always give
//! the same digest. The archive holds an OCI layout (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) plus a Docker `manifest.json`, so
//! `docker load`, `podman load`, `skopeo copy oci-archive:…` and
//! `ctr import` all take it.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr as _;

use anyhow::{Context, Result, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest as OciDigest, HistoryBuilder,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os,
    RootFsBuilder,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::util::{project_root, run, succeeds};

/// The images: binary name and whether it needs CA certificates.
pub(crate) const IMAGES: &[(&str, bool)] = &[
    ("intel-gpu-plugin", false),
    ("intel-gpu-labeler", true),
    ("intel-gpu-dra", true),
];
const TARGET: &str = "x86_64-unknown-linux-gnu";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file of the layer.
pub(crate) struct Entry {
    pub(crate) path: String,
    pub(crate) mode: u32,
    pub(crate) data: Vec<u8>,
}

fn layer_tar(entries: &[Entry], mtime: u64) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let mut dirs: Vec<String> = Vec::new();
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for e in &sorted {
        let mut prefix = String::new();
        for part in e
            .path
            .split('/')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, d)| d.to_vec())
            .unwrap_or_default()
        {
            prefix.push_str(part);
            prefix.push('/');
            if !dirs.contains(&prefix) {
                dirs.push(prefix.clone());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(mtime);
                h.set_size(0);
                builder.append_data(&mut h, &prefix, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(e.data.len() as u64);
        builder.append_data(&mut h, e.path.trim_start_matches('/'), e.data.as_slice())?;
    }
    Ok(builder.into_inner()?)
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// Assembles an image archive; returns the archive bytes and the manifest
/// digest.
pub(crate) fn assemble(
    name: &str,
    version: &str,
    revision: &str,
    entries: &[Entry],
    epoch: u64,
) -> Result<(Vec<u8>, String)> {
    let layer = layer_tar(entries, epoch)?;
    let diff_id = sha256_hex(&layer);
    let layer_gz = gzip(&layer)?;
    let layer_digest = sha256_hex(&layer_gz);
    let created = rfc3339(epoch)?;
    let entrypoint = format!("/usr/local/bin/{name}");
    let annotations: HashMap<String, String> = [
        ("org.opencontainers.image.title", name),
        ("org.opencontainers.image.version", version),
        ("org.opencontainers.image.revision", revision),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        ("org.opencontainers.image.created", created.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(vec![entrypoint])
                .user("0:0".to_owned())
                .labels(annotations.clone())
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_owned())
                .diff_ids(vec![format!("sha256:{diff_id}")])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created.clone())
                .created_by("cargo xtask image".to_owned())
                .build()?,
        ])
        .build()?;
    let config_bytes = canonical(&config)?;
    let config_digest = sha256_hex(&config_bytes);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(
            MediaType::ImageConfig,
            &config_bytes,
            &config_digest,
        )?)
        .layers(vec![descriptor(
            MediaType::ImageLayerGzip,
            &layer_gz,
            &layer_digest,
        )?])
        .annotations(annotations)
        .build()?;
    let manifest_bytes = canonical(&manifest)?;
    let manifest_digest = sha256_hex(&manifest_bytes);
    let reference = format!("{name}:{version}");
    let mut entry = descriptor(MediaType::ImageManifest, &manifest_bytes, &manifest_digest)?;
    entry.set_annotations(Some(
        [
            (
                "org.opencontainers.image.ref.name".to_owned(),
                version.to_owned(),
            ),
            (
                "io.containerd.image.name".to_owned(),
                format!("docker.io/library/{reference}"),
            ),
        ]
        .into_iter()
        .collect(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()?;
    // Docker's `manifest.json` (for `docker load`) has no OCI type.
    let docker = json!([{
        "Config": format!("blobs/sha256/{config_digest}"),
        "RepoTags": [reference],
        "Layers": [format!("blobs/sha256/{layer_digest}")],
    }]);
    let files: Vec<(String, Vec<u8>)> = vec![
        ("blobs/sha256/".into(), Vec::new()),
        (format!("blobs/sha256/{config_digest}"), config_bytes),
        (format!("blobs/sha256/{layer_digest}"), layer_gz),
        (format!("blobs/sha256/{manifest_digest}"), manifest_bytes),
        ("index.json".into(), canonical(&index)?),
        ("manifest.json".into(), serde_json::to_vec(&docker)?),
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
    ];
    let mut archive = tar::Builder::new(Vec::new());
    archive.mode(tar::HeaderMode::Deterministic);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        h.set_size(0);
        archive.append_data(&mut h, dir, std::io::empty())?;
    }
    for (path, data) in files.iter().filter(|(p, _)| !p.ends_with('/')) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        h.set_size(data.len() as u64);
        archive.append_data(&mut h, path, data.as_slice())?;
    }
    Ok((archive.into_inner()?, format!("sha256:{manifest_digest}")))
}

/// A descriptor of `bytes`, whose SHA-256 is `hex`.
fn descriptor(media_type: MediaType, bytes: &[u8], hex: &str) -> Result<Descriptor> {
    let digest = OciDigest::from_str(&format!("sha256:{hex}"))?;
    Ok(Descriptor::new(media_type, bytes.len() as u64, digest))
}

/// JSON with its object keys sorted: oci-spec keeps annotations and labels
/// in `HashMap`s, whose order changes from run to run; the digests must not.
fn canonical<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

/// `secs` after the Unix epoch as RFC 3339 UTC (`2023-11-14T22:13:20Z`).
fn rfc3339(secs: u64) -> Result<String> {
    let secs = i64::try_from(secs).context("SOURCE_DATE_EPOCH is too large")?;
    Ok(jiff::Timestamp::from_second(secs)
        .context("SOURCE_DATE_EPOCH is out of range")?
        .to_string())
}

fn epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn revision() -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(project_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// Builds the static release binaries in `target_dir`, with paths remapped.
fn build(target_dir: &Path, src: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(src)
        .args(["build", "--release", "--locked", "--target", TARGET, "-p", "intel-gpu-plugin", "-p", "intel-gpu-labeler", "-p", "intel-gpu-dra"])
        .env("CARGO_TARGET_DIR", target_dir)
        .env(
            "RUSTFLAGS",
            format!(
                "-C target-feature=+crt-static --remap-path-prefix={}=/src --remap-path-prefix={}=/cargo",
                src.display(),
                std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()))
            ),
        );
    run(&mut cmd).context("the static release build failed")?;
    Ok(target_dir.join(TARGET).join("release"))
}

fn entries(bin_dir: &Path, name: &str, ca: bool) -> Result<Vec<Entry>> {
    let binary = std::fs::read(bin_dir.join(name))
        .with_context(|| format!("no binary {name} in {}", bin_dir.display()))?;
    let mut out = vec![
        Entry {
            path: format!("/usr/local/bin/{name}"),
            mode: 0o755,
            data: binary,
        },
        Entry {
            path: "/etc/hosts".into(),
            mode: 0o644,
            data: b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        },
        Entry {
            path: "/etc/passwd".into(),
            mode: 0o644,
            data: b"root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n"
                .to_vec(),
        },
    ];
    if ca {
        let bundle = std::fs::read(CA_BUNDLE).with_context(|| format!("the labeller image needs CA certificates from {CA_BUNDLE} (Debian: ca-certificates)"))?;
        out.push(Entry {
            path: CA_BUNDLE.into(),
            mode: 0o644,
            data: bundle,
        });
    }
    Ok(out)
}

/// Builds both images from `src` into `out`; returns name → digest.
fn build_images(src: &Path, target_dir: &Path, out: &Path) -> Result<Vec<(String, String, u64)>> {
    let bins = build(target_dir, src)?;
    std::fs::create_dir_all(out)?;
    let version = env!("CARGO_PKG_VERSION");
    let rev = revision();
    let mut digests = Vec::new();
    for (name, ca) in IMAGES {
        let (archive, digest) =
            assemble(name, version, &rev, &entries(&bins, name, *ca)?, epoch())?;
        let path = out.join(format!("{name}.oci.tar"));
        std::fs::write(&path, &archive)?;
        let compressed = compressed_size(&archive)?;
        println!(
            "{} {digest} ({:.2} MiB compressed)",
            path.display(),
            compressed as f64 / 1048576.0
        );
        digests.push(((*name).to_owned(), digest, compressed));
    }
    Ok(digests)
}

/// The size of the image's layer blobs (what a registry stores).
fn compressed_size(archive: &[u8]) -> Result<u64> {
    let mut ar = tar::Archive::new(archive);
    let mut total = 0;
    for e in ar.entries()? {
        let e = e?;
        let p = e.path()?.to_string_lossy().into_owned();
        if p.starts_with("blobs/sha256/") && e.header().size()? > 4096 {
            total += e.header().size()?;
        }
    }
    Ok(total)
}

pub(crate) fn task(check: bool, reproducible: bool) -> Result<()> {
    let root = project_root();
    let out = root.join("target/images");
    let digests = build_images(&root, &root.join("target/image-build"), &out)?;
    for (name, _, size) in &digests {
        if *size > 6 * 1024 * 1024 {
            bail!("{name} is {size} bytes compressed, over the 6 MiB goal");
        }
    }
    if reproducible {
        // A second clean build from a copy elsewhere must give the same digests.
        let copy = std::env::temp_dir().join(format!("intel-gpu-repro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&copy);
        run(Command::new("git")
            .args(["clone", "-q"])
            .arg(&root)
            .arg(&copy))?;
        let again = build_images(
            &copy,
            &copy.join("target/image-build"),
            &copy.join("target/images"),
        )?;
        let _ = std::fs::remove_dir_all(&copy);
        for ((n, a, _), (_, b, _)) in digests.iter().zip(&again) {
            if a != b {
                bail!("{n} is not reproducible: {a} vs {b}");
            }
            println!("{n}: reproducible ({a})");
        }
    }
    if check {
        check_images(&out)?;
    }
    Ok(())
}

/// skopeo inspect, umoci unpack and runc run of `--version`, where the
/// tools exist.
fn check_images(out: &Path) -> Result<()> {
    let have = |t: &str| succeeds(Command::new(t).arg("--version"));
    for (name, _) in IMAGES {
        let archive = out.join(format!("{name}.oci.tar"));
        if have("skopeo") {
            run(Command::new("skopeo")
                .arg("inspect")
                .arg(format!("oci-archive:{}", archive.display())))?;
        } else {
            println!("skipped skopeo inspect: skopeo is not installed");
        }
        if !(have("umoci") && have("runc")) {
            println!("skipped umoci unpack and runc run: umoci or runc is not installed");
            continue;
        }
        let work =
            std::env::temp_dir().join(format!("intel-gpu-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(work.join(""))
            .current_dir(&work))?;
        let bundle = work.join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:{}", work.display(), env!("CARGO_PKG_VERSION")))
            .arg(&bundle))?;
        let config_path = bundle.join("config.json");
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!([format!("/usr/local/bin/{name}"), "--version"]);
        std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
        let outp = Command::new("runc")
            .args(["--root"])
            .arg(work.join("runc"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("check-{name}"))
            .output()?;
        let text = String::from_utf8_lossy(&outp.stdout);
        if !outp.status.success() || !text.starts_with(name) {
            bail!(
                "runc run {name} --version failed: {}{}",
                text,
                String::from_utf8_lossy(&outp.stderr)
            );
        }
        println!("runc: {}", text.trim());
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

// The CI `image` step: the assembly is deterministic and well formed, on a
// small stand-in binary (the release build is opt-in).
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may panic

    use super::*;

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                path: "/usr/local/bin/intel-gpu-plugin".into(),
                mode: 0o755,
                data: b"\x7fELF stand-in".to_vec(),
            },
            Entry {
                path: "/etc/hosts".into(),
                mode: 0o644,
                data: b"127.0.0.1 localhost\n".to_vec(),
            },
        ]
    }

    fn build(epoch: u64) -> (Vec<u8>, String) {
        assemble("intel-gpu-plugin", "0.1.0", "abc", &entries(), epoch).unwrap()
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_and_digest() {
        assert_eq!(build(1_700_000_000), build(1_700_000_000));
    }

    #[test]
    fn source_date_epoch_reaches_the_image() {
        assert_ne!(build(1_700_000_000).1, build(1_700_000_001).1);
    }

    #[test]
    fn headers_are_fixed_and_the_layout_is_complete() {
        let (archive, _) = build(1_700_000_000);
        let mut names = Vec::new();
        for e in tar::Archive::new(archive.as_slice()).entries().unwrap() {
            let e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(e.header().mtime().unwrap(), 1_700_000_000, "{name}");
            assert_eq!(e.header().uid().unwrap(), 0, "{name}");
            names.push(name);
        }
        for want in ["oci-layout", "index.json", "manifest.json"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }

    #[test]
    fn the_blobs_read_back_as_oci_types_and_skopeo_accepts_the_archive() {
        let (archive, digest) = build(1_700_000_000);
        let mut files = HashMap::new();
        for e in tar::Archive::new(archive.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(name, data);
        }
        let index =
            oci_spec::image::ImageIndex::from_reader(files["index.json"].as_slice()).unwrap();
        assert_eq!(index.manifests()[0].digest().to_string(), digest);
        let blob = |d: &str| {
            files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))].as_slice()
        };
        let manifest = oci_spec::image::ImageManifest::from_reader(blob(&digest)).unwrap();
        let config = oci_spec::image::ImageConfiguration::from_reader(blob(
            manifest.config().digest().as_ref(),
        ))
        .unwrap();
        assert_eq!(config.created().as_deref(), Some("2023-11-14T22:13:20Z"));
        if !succeeds(Command::new("skopeo").arg("--version")) {
            eprintln!("skopeo is not installed: the archive was not inspected by it (skipped)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.oci.tar");
        std::fs::write(&path, &archive).unwrap();
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(seen["Digest"], digest.as_str());
        assert_eq!(seen["Architecture"], "amd64");
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert!(rfc3339(u64::MAX).is_err());
    }
}
