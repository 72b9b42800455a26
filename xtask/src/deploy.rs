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

/// `grpcio` and `grpcio-tools` are the independent gRPC peer of the
/// framework's interop tests (≥ 1.57: the percent-encoded `:authority`).
const PY_TOOLS: &[&str] = &[
    "kubernetes-validate",
    "yamllint",
    "ansible-core",
    "grpcio>=1.57",
    "grpcio-tools>=1.57",
];

/// The CI virtualenv's `bin/`, with the Python tools installed.
pub(crate) fn venv() -> Result<PathBuf> {
    let dir = project_root().join("target/ci-venv");
    let bin = dir.join("bin");
    let ready = ["kubernetes-validate", "yamllint", "ansible-playbook"]
        .iter()
        .all(|t| bin.join(t).exists())
        && succeeds(Command::new(bin.join("python")).args(["-c", "import grpc, grpc_tools"]));
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
    check_ansible_template()
}

/// The Ansible role's manifest template: the `starlingx` overlay, with the
/// node selector and the images as role variables.
const ANSIBLE_TEMPLATE: &str =
    "deploy/ansible/roles/intel_gpu_plugins/templates/intel-gpu-plugin-daemonset.yaml.j2";

pub(crate) fn ansible_template() -> Result<String> {
    let rendered = std::fs::read_to_string(render("starlingx")?)?;
    if rendered.contains("{{") || rendered.contains("{%") {
        bail!("the starlingx overlay contains Jinja delimiters");
    }
    let selector = "        intelgpu: enabled\n";
    if !rendered.contains(selector) {
        bail!("the starlingx overlay no longer selects `intelgpu: enabled`");
    }
    let out = rendered
        .replace(selector, "        {{ _intel_gpu_label.split('=')[0] }}: \"{{ _intel_gpu_label.split('=', 1)[1] }}\"\n")
        .replace("image: intel-gpu-plugin:0.1.0", "image: {{ intel_gpu_plugin_image }}")
        .replace("image: intel-gpu-labeler:0.1.0", "image: {{ intel_gpu_labeler_image }}");
    Ok(format!(
        "# Generated from deploy/overlays/starlingx by `cargo xtask manifests --write`. Do not edit.\n{out}"
    ))
}

/// `cargo xtask manifests [--write]`: renders the overlays; with `--write`
/// regenerates the Ansible template.
pub(crate) fn task(args: &[String]) -> Result<()> {
    match args {
        [] => {
            for (overlay, _) in OVERLAYS {
                println!("{}", render(overlay)?.display());
            }
            Ok(())
        }
        [w] if w == "--write" => {
            std::fs::write(project_root().join(ANSIBLE_TEMPLATE), ansible_template()?)?;
            println!("wrote {ANSIBLE_TEMPLATE}");
            Ok(())
        }
        _ => bail!("usage: cargo xtask manifests [--write]"),
    }
}

fn check_ansible_template() -> Result<()> {
    let current =
        std::fs::read_to_string(project_root().join(ANSIBLE_TEMPLATE)).unwrap_or_default();
    if current != ansible_template()? {
        bail!("{ANSIBLE_TEMPLATE} is stale: run `cargo xtask manifests --write`");
    }
    Ok(())
}

/// Runs the Ansible role against localhost into a temporary root (kubectl
/// switched off) and checks what it wrote.
pub(crate) fn check_ansible() -> Result<()> {
    let bin = venv()?;
    let root = project_root();
    let playbook = root.join("deploy/ansible/site.yml");
    run(Command::new(bin.join("ansible-playbook"))
        .args(["--syntax-check", "-i", "localhost,"])
        .arg(&playbook))?;
    let lint = bin.join("ansible-lint");
    if lint.exists() {
        run(Command::new(lint).arg("--offline").arg(&playbook))?;
    } else {
        eprintln!("ansible-lint is not installed: skipped (pip install ansible-lint to run it)");
    }
    let cases: &[(&str, Option<&str>)] = &[
        (
            r#"{"import_plugins": true, "kube_plugins": ["intelgpu", "intelqat"]}"#,
            Some(
                r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#,
            ),
        ),
        (
            r#"{"import_plugins": true, "k8s_plugins": {"intel-gpu-plugin": "intelgpu=enabled"}}"#,
            Some(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#),
        ),
        (
            r#"{"import_plugins": false, "kube_plugins": ["intelgpu"]}"#,
            None,
        ),
    ];
    for (vars, want) in cases {
        let tmp = root.join("target/ansible-root");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let extra = format!(
            r#"{{"ansible_python_interpreter": "{}", "intel_gpu_root": "{}", "intel_gpu_apply": false, {}"#,
            bin.join("python").display(),
            tmp.display(),
            vars.trim_start_matches('{')
        );
        let play = |c: &mut Command| {
            c.args(["-i", "localhost,", "-c", "local", "-e"])
                .arg(&extra)
                .arg(&playbook)
                .env("ANSIBLE_NOCOLOR", "1");
        };
        let mut first = Command::new(bin.join("ansible-playbook"));
        play(&mut first);
        run(&mut first)?;
        let file = tmp.join("etc/platform/enabled_kube_plugins");
        let Some(want) = want else {
            if file.exists() {
                bail!(
                    "the role wrote {} although import_plugins is false",
                    file.display()
                );
            }
            continue;
        };
        let written = std::fs::read_to_string(&file)
            .with_context(|| format!("the role did not write {}", file.display()))?;
        if written != *want {
            bail!("the role wrote {written:?}, expected {want:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        if mode != 0o640 {
            bail!("{} has mode {mode:o}, expected 640", file.display());
        }
        // Read back by our own parser, rendered back to the same bytes.
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args([
                "run",
                "-q",
                "--locked",
                "-p",
                "enabled-plugins",
                "--example",
                "check",
                "--",
            ])
            .arg(&file)
            .output()?;
        if !out.status.success()
            || String::from_utf8_lossy(&out.stdout).trim_end_matches('\n') != written
        {
            bail!(
                "the enabled-plugins check example does not read back the role's file: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for manifest in [
            "etc/kubernetes/intel-gpu-plugin-daemonset.yaml",
            "etc/kubernetes/enabled-kube-plugins-configmap.yaml",
        ] {
            for v in ["1.27.0", "1.34.0"] {
                run(Command::new(bin.join("kubernetes-validate"))
                    .args(["--strict", "--quiet", "-k", v])
                    .arg(tmp.join(manifest)))?;
            }
        }
        // Idempotent: a second run changes nothing.
        let mut again = Command::new(bin.join("ansible-playbook"));
        play(&mut again);
        let out = again.output()?;
        let recap = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !recap.contains("changed=0") {
            bail!("a second run of the role was not a no-op:\n{recap}");
        }
    }
    Ok(())
}
