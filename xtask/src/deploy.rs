//! CI checks of what ships besides the binaries: the manifests under
//! `deploy/` (rendered with `kubectl kustomize`, validated offline with
//! `kubernetes-validate --strict`, linted with `yamllint`) and the Ansible
//! role. Python tools are installed into `target/ci-venv` when missing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{project_root, run, succeeds};

/// Overlays and the Kubernetes versions each is validated against (1.27:
/// the oldest StarlingX release we target; the admission policy needs 1.30).
pub(crate) const OVERLAYS: &[(&str, &[&str])] = &[
    ("starlingx", &["1.27.0", "1.34.0"]),
    ("nfd", &["1.27.0", "1.34.0"]),
    ("monitoring", &["1.27.0", "1.34.0"]),
    ("microk8s", &["1.27.0", "1.34.0"]),
    ("k0s", &["1.27.0", "1.34.0"]),
    ("admission-policy", &["1.30.0", "1.34.0"]),
];

const PY_TOOLS: &[&str] = &["kubernetes-validate", "yamllint", "ansible-core"];

/// The CI virtualenv's `bin/`, with the Python tools installed.
pub(crate) fn venv() -> Result<PathBuf> {
    let dir = project_root().join("target/ci-venv");
    let bin = dir.join("bin");
    let ready = ["kubernetes-validate", "yamllint", "ansible-playbook"]
        .iter()
        .all(|t| bin.join(t).exists());
    if !ready {
        eprintln!("installing {} into {}", PY_TOOLS.join(", "), dir.display());
        if !bin.join("pip").exists() {
            run(Command::new("python3").arg("-m").arg("venv").arg(&dir))
                .context("python3 -m venv failed: Python 3 with venv is required")?;
        }
        run(Command::new(bin.join("pip"))
            .args(["install", "-q"])
            .args(PY_TOOLS))
        .context("could not install the Python tools from PyPI")?;
    }
    Ok(bin)
}

/// Renders an overlay with `kubectl kustomize` into `target/manifests/`.
pub(crate) fn render(overlay: &str) -> Result<PathBuf> {
    let root = project_root();
    let out_dir = root.join("target/manifests");
    std::fs::create_dir_all(&out_dir)?;
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("deploy/overlays").join(overlay))
        .output()
        .context("`kubectl` is needed to render the manifests (kubectl kustomize works offline)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy/overlays/{overlay} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = out_dir.join(format!("{overlay}.yaml"));
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

pub(crate) fn check_manifests() -> Result<()> {
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        bail!("`kubectl` is missing: install it (Debian: kubectl) to render the manifests offline");
    }
    let bin = venv()?;
    run(Command::new(bin.join("yamllint"))
        .arg("-c")
        .arg(project_root().join(".yamllint"))
        .arg(project_root().join("deploy")))?;
    for (overlay, versions) in OVERLAYS {
        let path = render(overlay)?;
        for v in *versions {
            run(Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", v])
                .arg(&path))
            .with_context(|| {
                format!("deploy/overlays/{overlay} is not valid for Kubernetes {v}")
            })?;
        }
    }
    Ok(())
}
