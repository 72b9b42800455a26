//! CI checks of what ships besides the binaries: the manifests under
//! `deploy/` (rendered with `kubectl kustomize`, validated offline with
//! `kubernetes-validate --strict`, linted with `yamllint`) and the Ansible
//! role. Python tools are installed into `target/ci-venv` when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{project_root, run, succeeds};

/// Overlays and the Kubernetes versions each is validated against: the
/// base (and so every overlay on it) needs 1.30 (the labeller's admission
/// policy, `recursiveReadOnly`); `before-1.30` and the StarlingX overlays
/// leave both out, for 1.27 and the oldest StarlingX releases we target;
/// DRA's v1 API needs 1.34.
pub(crate) const OVERLAYS: &[(&str, &[&str])] = &[
    ("starlingx", &["1.25.0", "1.34.0"]),
    ("starlingx-app", &["1.28.0", "1.34.0"]),
    ("before-1.30", &["1.27.0", "1.34.0"]),
    ("nfd", &["1.30.0", "1.34.0"]),
    ("monitoring", &["1.30.0", "1.34.0"]),
    ("microk8s", &["1.30.0", "1.34.0"]),
    ("k0s", &["1.30.0", "1.34.0"]),
    ("admission-policy", &["1.30.0", "1.34.0"]),
    // resource.k8s.io/v1 (DeviceClass, ResourceSlice) is GA from 1.34.
    ("dra", &["1.34.0"]),
];

/// `grpcio` and `grpcio-tools` are the independent gRPC peer of the
/// framework's interop tests (≥ 1.57: the percent-encoded `:authority`);
/// `cel-python` evaluates the labeller's admission policy
/// (`xtask/scripts/policy.py`).
const PY_TOOLS: &[&str] = &[
    "kubernetes-validate",
    "yamllint",
    "ansible-core",
    "grpcio>=1.57",
    "grpcio-tools>=1.57",
    "cel-python",
];

/// The CI virtualenv's `bin/`, with the Python tools installed.
pub(crate) fn venv() -> Result<PathBuf> {
    let dir = project_root().join("target/ci-venv");
    let bin = dir.join("bin");
    let ready = ["kubernetes-validate", "yamllint", "ansible-playbook"]
        .iter()
        .all(|t| bin.join(t).exists())
        && succeeds(
            Command::new(bin.join("python")).args(["-c", "import grpc, grpc_tools, celpy"]),
        );
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
    render_dir(&format!("overlays/{overlay}"), overlay)
}

/// Renders `deploy/<dir>` into `target/manifests/<name>.yaml`.
fn render_dir(dir: &str, name: &str) -> Result<PathBuf> {
    let root = project_root();
    let out_dir = root.join("target/manifests");
    std::fs::create_dir_all(&out_dir)?;
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("deploy").join(dir))
        .output()
        .context("`kubectl` is needed to render the manifests (kubectl kustomize works offline)")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy/{dir} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = out_dir.join(format!("{name}.yaml"));
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
    let mut rendered = std::collections::BTreeMap::new();
    for (overlay, versions) in OVERLAYS {
        let path = render(overlay)?;
        rendered.insert(*overlay, path.clone());
        for v in *versions {
            run(Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", v])
                .arg(&path))
            .with_context(|| {
                format!("deploy/overlays/{overlay} is not valid for Kubernetes {v}")
            })?;
        }
    }
    let starlingx = rendered
        .get("starlingx")
        .context("the starlingx overlay is not among those rendered")?;
    check_ansible_template(starlingx)?;
    let app = rendered
        .get("starlingx-app")
        .context("the starlingx-app overlay is not among those rendered")?;
    check_starlingx_migration(&bin, starlingx, app)?;
    // The labeller's admission policy decides the labeller's own writes
    // and the ones it must refuse as intended.
    run(Command::new(bin.join("python"))
        .arg(project_root().join("xtask/scripts/policy.py"))
        .arg(render_dir("base", "base")?))
    .context("the labeller's admission policy decides a case wrongly")?;
    Ok(())
}

/// What `kubectl apply` of our manifests does next to the GPU plugins
/// StarlingX runs (`xtask/scripts/migration.py`): the `starlingx` overlay
/// replaces the bootstrap's plugin in place; next to the operator
/// application's plugin only `starlingx-app` is safe. Each unsafe pairing
/// must be reported, or the check could not fail.
fn check_starlingx_migration(bin: &Path, starlingx: &Path, app: &Path) -> Result<()> {
    const BOOTSTRAP: &str = "xtask/fixtures/starlingx-bootstrap-plugins.yaml";
    const APP: &str = "xtask/fixtures/operator-app-gpu-daemonset.yaml";
    const TWO: &str = "both run the GPU plugin on a node";
    let root = project_root();
    for fixture in [BOOTSTRAP, APP] {
        for v in ["1.25.0", "1.34.0"] {
            run(Command::new(bin.join("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", v])
                .arg(root.join(fixture)))?;
        }
    }
    let base = render_dir("base", "base")?;
    let cases: [(&str, &Path, Option<&str>); 5] = [
        (BOOTSTRAP, starlingx, None),
        (BOOTSTRAP, &base, Some(TWO)),
        (APP, app, None),
        (APP, starlingx, Some(TWO)),
        (APP, &base, Some(TWO)),
    ];
    for (old, new, problem) in cases {
        let out = Command::new(bin.join("python"))
            .arg(root.join("xtask/scripts/migration.py"))
            .arg(root.join(old))
            .arg(new)
            .output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        let as_expected = match problem {
            None => out.status.success(),
            Some(p) => out.status.code() == Some(1) && said.contains(p),
        };
        if !as_expected {
            bail!(
                "applying {} over {old}: expected {}, the migration check said\n{said}{}",
                new.display(),
                problem.unwrap_or("no problem"),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// The Ansible role's manifest template: the `starlingx` overlay, with the
/// GPU plugin's node label, the images and the pull secret as role
/// variables.
const ANSIBLE_TEMPLATE: &str =
    "deploy/ansible/roles/intel_gpu_plugins/templates/intel-gpu-plugin.yaml.j2";

pub(crate) fn ansible_template(starlingx: &Path) -> Result<String> {
    let rendered = std::fs::read_to_string(starlingx)?;
    if rendered.contains("{{") || rendered.contains("{%") {
        bail!("the starlingx overlay contains Jinja delimiters");
    }
    let substitutions = [
        (
            "        intelgpu: enabled\n",
            "        {{ _intel_gpu_label.split('=')[0] }}: \"{{ _intel_gpu_label.split('=', 1)[1] }}\"\n",
        ),
        (
            "image: intel-gpu-plugin:0.1.0\n",
            "image: \"{{ intel_gpu_plugin_image }}\"\n",
        ),
        (
            "image: intel-gpu-labeler:0.1.0\n",
            "image: \"{{ intel_gpu_labeler_image }}\"\n",
        ),
        (
            "- name: docker-registry-secret\n",
            "- name: \"{{ intel_gpu_image_pull_secret }}\"\n",
        ),
    ];
    let mut out = rendered;
    for (from, to) in substitutions {
        if !out.contains(from) {
            bail!("the starlingx overlay no longer contains {from:?}");
        }
        out = out.replace(from, to);
    }
    if out.contains("image: intel-gpu") {
        bail!("the starlingx overlay has an image the Ansible template does not qualify");
    }
    Ok(format!(
        "# Generated from deploy/overlays/starlingx by `cargo xtask manifests --write`. Do not edit.\n{out}"
    ))
}

/// `cargo xtask manifests [--write]`: renders the overlays; with `--write`
/// regenerates the Ansible template.
pub(crate) fn task(write: bool) -> Result<()> {
    if write {
        let template = ansible_template(&render("starlingx")?)?;
        std::fs::write(project_root().join(ANSIBLE_TEMPLATE), template)?;
        println!("wrote {ANSIBLE_TEMPLATE}");
        return Ok(());
    }
    for (overlay, _) in OVERLAYS {
        println!("{}", render(overlay)?.display());
    }
    Ok(())
}

fn check_ansible_template(starlingx: &Path) -> Result<()> {
    let current =
        std::fs::read_to_string(project_root().join(ANSIBLE_TEMPLATE)).unwrap_or_default();
    if current != ansible_template(starlingx)? {
        bail!("{ANSIBLE_TEMPLATE} is stale: run `cargo xtask manifests --write`");
    }
    Ok(())
}

/// One run of the role in CI: the override file (StarlingX's shape), extra
/// variables, and what it must do.
struct AnsibleCase {
    overrides: Option<&'static str>,
    extra: &'static str,
    /// The enabled-plugins file's bytes, derived from StarlingX's task
    /// (`copy: content: "{{ k8s_plugins }}"`, which writes a dict or list as
    /// Python's `json.dumps` with default separators, in the order given), or
    /// `None` when the step must do nothing.
    file: Option<&'static str>,
    /// The GPU plugin's label, or `None` when no GPU manifest is written.
    gpu_label: Option<&'static str>,
    /// The image the manifest names.
    image: &'static str,
    /// A failure the role must report, with this text.
    fails_with: Option<&'static str>,
    /// The host's /etc/build.info.
    build_info: &'static str,
}

/// A StarlingX 10.0 controller's /etc/build.info (the lines that matter).
const BUILD_INFO: &str = "OS=\"debian\"\nSW_VERSION=\"24.09\"\nBUILD_TARGET=\"Host Installer\"\n";

impl AnsibleCase {
    /// The role writes `file` and, with a GPU label, the manifest naming
    /// `image`.
    const fn writes(
        overrides: Option<&'static str>,
        extra: &'static str,
        file: &'static str,
        gpu_label: Option<&'static str>,
        image: &'static str,
    ) -> Self {
        Self {
            file: Some(file),
            gpu_label,
            image,
            ..Self::skips(overrides, extra)
        }
    }

    /// The step does nothing and succeeds.
    const fn skips(overrides: Option<&'static str>, extra: &'static str) -> Self {
        Self {
            overrides,
            extra,
            file: None,
            gpu_label: None,
            image: "",
            fails_with: None,
            build_info: BUILD_INFO,
        }
    }

    /// The role fails with `text` and writes nothing.
    const fn fails(
        overrides: Option<&'static str>,
        extra: &'static str,
        text: &'static str,
    ) -> Self {
        Self {
            fails_with: Some(text),
            ..Self::skips(overrides, extra)
        }
    }

    /// On a host whose /etc/build.info is `build_info`.
    const fn on(self, build_info: &'static str) -> Self {
        Self { build_info, ..self }
    }
}

const GPU: Option<&str> = Some("intelgpu=enabled");
const GPU_ONLY: &str = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;
const DOCKER_IO_IMAGE: &str = "docker.io/intel-gpu-k8s-rs/intel-gpu-plugin:0.1.0";
const NOT_A_DICT: &str = "k8s_plugins must be a dict from plugin to node label";

const ANSIBLE_CASES: &[AnsibleCase] = &[
    AnsibleCase::skips(Some("k8s-plugins-default.yml"), "{}"),
    AnsibleCase::writes(
        Some("k8s-plugins-dict.yml"),
        r#"{"docker_registry": {"url": "registry.local:9001"}}"#,
        r#"{"intel-qat-plugin": "intelqat=enabled", "intel-gpu-plugin": "intelgpu=enabled"}"#,
        GPU,
        "registry.local:9001/intel-gpu-k8s-rs/intel-gpu-plugin:0.1.0",
    ),
    // Recorded as the released dict form: sysinv reads .values().
    AnsibleCase::writes(
        Some("k8s-plugins-list.yml"),
        "{}",
        GPU_ONLY,
        GPU,
        DOCKER_IO_IMAGE,
    ),
    AnsibleCase::writes(
        Some("seed-aliases.yml"),
        "{}",
        r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#,
        GPU,
        DOCKER_IO_IMAGE,
    ),
    // StarlingX skips the step outside bootstrap (restore, upgrade).
    AnsibleCase::skips(Some("k8s-plugins-dict.yml"), r#"{"mode": "restore"}"#),
    AnsibleCase::writes(
        None,
        r#"{"k8s_plugins": {"intel-qat-plugin": "intelqat=enabled"}}"#,
        r#"{"intel-qat-plugin": "intelqat=enabled"}"#,
        None,
        "",
    ),
    AnsibleCase::fails(None, r#"{"k8s_plugins": "intelgpu"}"#, NOT_A_DICT),
    AnsibleCase::fails(None, r#"{"k8s_plugins": 5}"#, NOT_A_DICT),
    AnsibleCase::fails(
        None,
        r#"{"k8s_plugins": {"intel-gpu": "intelgpu=enabled"}}"#,
        "k8s_plugins names intel-gpu, which is not a StarlingX device plugin",
    ),
    AnsibleCase::fails(
        None,
        r#"{"k8s_plugins": {"intel-gpu-plugin": "intelgpu"}}"#,
        "which is not key=value",
    ),
    AnsibleCase::fails(Some("k8s-plugins-dict.yml"), "{}", "has no SW_VERSION")
        .on("OS=\"debian\"\nSW_VERSION=\"\"\n"),
    // CRLF and spaces around `=`: still the release.
    AnsibleCase::writes(
        Some("k8s-plugins-list.yml"),
        "{}",
        GPU_ONLY,
        GPU,
        DOCKER_IO_IMAGE,
    )
    .on("OS=\"debian\"\r\nSW_VERSION = \"24.09\"\r\n"),
];

/// The release the scratch root's /etc/build.info names.
const ANSIBLE_RELEASE: &str = "24.09";

/// Runs the role against localhost into a scratch root laid out as a
/// StarlingX controller at the bootstrap step (kubectl switched off), in
/// check mode, for real, and again, and checks what it wrote.
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
    let defaults = std::fs::read_to_string(
        root.join("deploy/ansible/roles/intel_gpu_plugins/defaults/main.yml"),
    )?;
    // CI cannot create StarlingX's group; the role's default must name it.
    if !defaults.contains("\nenabled_kube_plugins_group: sys_protected\n") {
        bail!("the role's default group for enabled_kube_plugins is not sys_protected");
    }
    let group = String::from_utf8(Command::new("id").arg("-gn").output()?.stdout)?;
    let gid: u32 = String::from_utf8(Command::new("id").arg("-g").output()?.stdout)?
        .trim()
        .parse()
        .context("`id -g` did not print a number")?;
    for case in ANSIBLE_CASES {
        check_ansible_case(&bin, &playbook, case, group.trim(), gid).with_context(|| {
            format!("the Ansible role with {:?} {}", case.overrides, case.extra)
        })?;
    }
    Ok(())
}

fn check_ansible_case(
    bin: &Path,
    playbook: &Path,
    case: &AnsibleCase,
    group: &str,
    gid: u32,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = project_root();
    let tmp = root.join("target/ansible-root");
    let _ = std::fs::remove_dir_all(&tmp);
    let permdir = tmp.join("opt/platform/config").join(ANSIBLE_RELEASE);
    std::fs::create_dir_all(&permdir)?;
    std::fs::create_dir_all(tmp.join("etc/kubernetes"))?;
    std::fs::write(tmp.join("etc/build.info"), case.build_info)?;
    let scratch = serde_json::json!({
        "ansible_python_interpreter": bin.join("python"),
        "ansible_become": false,
        "intel_gpu_root": tmp,
        "intel_gpu_apply": false,
        "enabled_kube_plugins_group": group,
    })
    .to_string();
    let playbook_run = |check: bool| -> Result<std::process::Output> {
        let mut c = Command::new(bin.join("ansible-playbook"));
        c.args(["-i", "localhost,", "-c", "local", "-e"])
            .arg(&scratch);
        if let Some(file) = case.overrides {
            c.arg("-e").arg(format!(
                "@{}",
                root.join("deploy/ansible/examples").join(file).display()
            ));
        }
        c.arg("-e").arg(case.extra);
        if check {
            c.arg("--check");
        }
        c.arg(playbook).env("ANSIBLE_NOCOLOR", "1");
        Ok(c.output()?)
    };
    let output = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let file = permdir.join("enabled_kube_plugins");
    let manifest = tmp.join("etc/kubernetes/intel-gpu-daemonset.yaml");

    // Check mode: succeeds (or fails the same way) and writes nothing.
    let checked = playbook_run(true)?;
    if let Some(text) = case.fails_with {
        let out = output(&checked);
        if checked.status.success() || !out.contains(text) {
            bail!("check mode did not fail with {text:?}:\n{out}");
        }
    } else if !checked.status.success() {
        bail!("check mode failed:\n{}", output(&checked));
    }
    if file.exists() || manifest.exists() {
        bail!("check mode wrote files");
    }

    let first = playbook_run(false)?;
    if let Some(text) = case.fails_with {
        let out = output(&first);
        if first.status.success() || !out.contains(text) {
            bail!("the role did not fail with {text:?}:\n{out}");
        }
        // Nowhere: not under a release directory named "" either.
        if file.exists()
            || manifest.exists()
            || tmp
                .join("opt/platform/config/enabled_kube_plugins")
                .exists()
        {
            bail!("the role wrote files although it failed");
        }
        return Ok(());
    }
    if !first.status.success() {
        bail!("the role failed:\n{}", output(&first));
    }
    match case.file {
        None if file.exists() => bail!("the role wrote {}", file.display()),
        None => {}
        Some(want) => {
            let written = std::fs::read_to_string(&file)
                .with_context(|| format!("the role did not write {}", file.display()))?;
            if written != want {
                bail!("the role wrote {written:?}, StarlingX writes {want:?}");
            }
            // What sysinv (json.loads, .values()) and restore (include_vars)
            // need: an object of strings.
            let parsed: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&written).context("the file is not a JSON object")?;
            if !parsed.values().all(serde_json::Value::is_string) {
                bail!("the file's values are not all strings: {written}");
            }
            let meta = std::fs::metadata(&file)?;
            if meta.permissions().mode() & 0o777 != 0o640 || meta.gid() != gid {
                bail!(
                    "{} has mode {:o} and gid {}; expected 640 and {gid}",
                    file.display(),
                    meta.permissions().mode() & 0o777,
                    meta.gid()
                );
            }
            // Our own reader takes StarlingX's bytes and finds the GPU label.
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
            let said = String::from_utf8_lossy(&out.stderr);
            let expected = match case.gpu_label {
                Some(label) => format!("the GPU plugin is enabled with label {label}"),
                None => "the GPU plugin is not enabled".to_owned(),
            };
            if !out.status.success() || !said.contains(&expected) {
                bail!("the enabled-plugins reader says {said:?}, expected {expected:?}");
            }
        }
    }
    match case.gpu_label {
        None if manifest.exists() => bail!("the role wrote {}", manifest.display()),
        None => {}
        Some(label) => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("the role did not write {}", manifest.display()))?;
            let (key, value) = label.split_once('=').unwrap_or((label, ""));
            for want in [
                format!("        {key}: \"{value}\"\n"),
                format!("image: \"{}\"\n", case.image),
                "- name: \"docker-registry-secret\"\n".to_owned(),
                "priorityClassName: system-node-critical\n".to_owned(),
            ] {
                if !text.contains(&want) {
                    bail!("{} lacks {want:?}", manifest.display());
                }
            }
            // Replaces the plugin StarlingX's own step deployed, in place.
            run(Command::new(bin.join("python"))
                .arg(root.join("xtask/scripts/migration.py"))
                .arg(root.join("xtask/fixtures/starlingx-bootstrap-plugins.yaml"))
                .arg(&manifest))
            .context("the role's manifest does not replace StarlingX's plugin in place")?;
            // kubernetes-validate has no schema older than 1.25 (StarlingX 8.0 runs 1.24).
            for v in ["1.25.0", "1.34.0"] {
                run(Command::new(bin.join("kubernetes-validate"))
                    .args(["--strict", "--quiet", "-k", v])
                    .arg(&manifest))?;
            }
        }
    }
    // Idempotent: a second run changes nothing.
    let again = playbook_run(false)?;
    let recap = output(&again);
    if !again.status.success() || !recap.contains("changed=0") {
        bail!("a second run of the role was not a no-op:\n{recap}");
    }
    Ok(())
}
