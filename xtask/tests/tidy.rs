//! Repository rules, checked as ordinary tests ("tidy").
//!
//! Each test names the rule it enforces; a failure lists every offending
//! place, so one run shows all of them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every file below `dir` (relative to the root) whose name ends in `ext`.
fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path.to_string_lossy().ends_with(ext) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), ext, &mut out);
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The manifests of every workspace member.
fn member_manifests() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for group in ["crates", "testkit", "bins"] {
        for entry in std::fs::read_dir(root().join(group)).unwrap().flatten() {
            let m = entry.path().join("Cargo.toml");
            if m.exists() {
                out.push(m);
            }
        }
    }
    out.push(root().join("xtask/Cargo.toml"));
    out.sort();
    out
}

fn manifest(path: &Path) -> toml::Table {
    read(path)
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dependency_tables(m: &toml::Table) -> Vec<(&'static str, &toml::Table)> {
    ["dependencies", "dev-dependencies", "build-dependencies"]
        .into_iter()
        .filter_map(|k| m.get(k).and_then(toml::Value::as_table).map(|t| (k, t)))
        .collect()
}

fn assert_none(rule: &str, offenders: Vec<String>) {
    assert!(
        offenders.is_empty(),
        "rule broken: {rule}\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn every_lib_rs_opens_with_a_crate_doc() {
    let offenders = files("crates", "/src/lib.rs")
        .into_iter()
        .chain(files("testkit", "/src/lib.rs"))
        .filter(|p| !read(p).starts_with("//!"))
        .map(|p| rel(&p))
        .collect();
    assert_none("every lib.rs starts with a `//!` crate doc", offenders);
}

#[test]
fn every_member_inherits_workspace_lints_and_package_fields() {
    let mut offenders = Vec::new();
    for path in member_manifests() {
        let m = manifest(&path);
        let lints_ok = m
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(toml::Value::as_bool)
            == Some(true);
        if !lints_ok {
            offenders.push(format!(
                "{}: missing `[lints] workspace = true`",
                rel(&path)
            ));
        }
        let package = m.get("package").and_then(toml::Value::as_table);
        for field in ["edition", "rust-version", "license", "version"] {
            let inherited = package
                .and_then(|p| p.get(field))
                .and_then(|f| f.get("workspace"))
                .and_then(toml::Value::as_bool)
                == Some(true);
            if !inherited {
                offenders.push(format!(
                    "{}: `{field}` not inherited from the workspace",
                    rel(&path)
                ));
            }
        }
        if package.and_then(|p| p.get("description")).is_none() {
            offenders.push(format!("{}: no description", rel(&path)));
        }
    }
    assert_none("members inherit lints and package fields", offenders);
}

#[test]
fn every_dependency_version_is_set_once_in_the_workspace() {
    let mut offenders = Vec::new();
    for path in member_manifests() {
        let m = manifest(&path);
        for (section, deps) in dependency_tables(&m) {
            for (name, spec) in deps {
                let inherited = spec.get("workspace").and_then(toml::Value::as_bool) == Some(true);
                if !inherited {
                    offenders.push(format!("{} [{section}] {name}", rel(&path)));
                }
            }
        }
    }
    assert_none("dependencies use `workspace = true`", offenders);
}

#[test]
fn libraries_do_not_use_binary_only_crates() {
    const BINARY_ONLY: &[&str] = &["anyhow", "clap", "tracing-subscriber"];
    let mut offenders = Vec::new();
    // Shipped libraries only: test kits (testkit/) such as the demo
    // driver may report errors with anyhow.
    for path in files("crates", "Cargo.toml") {
        let m = manifest(&path);
        if let Some(deps) = m.get("dependencies").and_then(toml::Value::as_table) {
            for name in BINARY_ONLY {
                if deps.contains_key(*name) {
                    offenders.push(format!("{} depends on {name}", rel(&path)));
                }
            }
        }
    }
    assert_none(
        "no anyhow, clap or tracing-subscriber in crates/*",
        offenders,
    );
}

/// Crates that exist for tests, benchmarks and the demo only: every
/// member under `testkit/`.
fn test_kits() -> Vec<String> {
    std::fs::read_dir(root().join("testkit"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| {
            let m = manifest(&e.path().join("Cargo.toml"));
            m["package"]["name"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn the_folder_tells_the_role() {
    // Shipped libraries in crates/, test kits and dev tools in testkit/:
    // a member whose name says emulator, fake, soak, demo, bench or
    // null is a test kit and must live there; and no crate in crates/
    // depends on a test kit outside its dev-dependencies.
    let kits = test_kits();
    assert!(kits.len() >= 7, "testkit/ holds the test kits: {kits:?}");
    let mut offenders = Vec::new();
    for path in files("crates", "Cargo.toml") {
        let m = manifest(&path);
        let name = m["package"]["name"].as_str().unwrap_or_default();
        if ["emulator", "fake", "soak", "demo", "bench", "null"]
            .iter()
            .any(|w| name.contains(w))
        {
            offenders.push(format!("{}: a test kit in crates/", rel(&path)));
        }
        for (table, deps) in dependency_tables(&m) {
            if table == "dev-dependencies" {
                continue;
            }
            for dep in deps.keys() {
                if kits.contains(dep) {
                    offenders.push(format!("{}: {table} on test kit {dep}", rel(&path)));
                }
            }
        }
    }
    assert_none(
        "shipped crates live in crates/ and never depend on a test kit",
        offenders,
    );
}

#[test]
fn shipped_binaries_carry_no_test_code() {
    let mut offenders = Vec::new();
    for path in files("bins", "Cargo.toml") {
        let m = manifest(&path);
        let deps = m.get("dependencies").and_then(toml::Value::as_table);
        for (name, spec) in deps.into_iter().flatten() {
            if test_kits().contains(name) {
                offenders.push(format!("{}: depends on test-only crate {name}", rel(&path)));
            }
            let features = spec.get("features").and_then(toml::Value::as_array);
            for f in features.into_iter().flatten() {
                let f = f.as_str().unwrap_or_default();
                if f.contains("test") || f.contains("emulator") || f.contains("fake") {
                    offenders.push(format!("{}: enables feature {name}/{f}", rel(&path)));
                }
            }
        }
    }
    assert_none(
        "shipped binaries contain no emulator or fixture code",
        offenders,
    );
}

#[test]
fn no_unfinished_code_markers() {
    let mut offenders = Vec::new();
    for dir in ["crates", "testkit", "bins", "xtask/src"] {
        for path in files(dir, ".rs") {
            for (i, line) in read(&path).lines().enumerate() {
                for marker in ["todo!(", "unimplemented!(", "dbg!("] {
                    if line.contains(marker) && !line.trim_start().starts_with("//") {
                        offenders.push(format!("{}:{}: {marker}", rel(&path), i + 1));
                    }
                }
            }
        }
    }
    assert_none("no todo!, unimplemented! or dbg! in the code", offenders);
}

#[test]
fn unsafe_blocks_carry_a_safety_comment() {
    let mut offenders = Vec::new();
    for dir in ["crates", "testkit", "bins", "xtask/src"] {
        for path in files(dir, ".rs") {
            let text = read(&path);
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if !code.contains("unsafe {") && !code.contains("unsafe impl") {
                    continue;
                }
                let window = &lines[i.saturating_sub(6)..=i];
                if !window.iter().any(|l| l.contains("SAFETY:")) {
                    offenders.push(format!("{}:{}", rel(&path), i + 1));
                }
            }
        }
    }
    assert_none(
        "every unsafe block has a `// SAFETY:` comment just above it",
        offenders,
    );
}

#[test]
fn library_code_takes_filesystem_roots_as_parameters() {
    const HOST_PATHS: &[&str] = &[
        "\"/sys",
        "\"/dev",
        "\"/var/lib/kubelet",
        "\"/var/run/cdi",
        "\"/etc/",
    ];
    let mut offenders = Vec::new();
    for path in files("crates", ".rs")
        .into_iter()
        .chain(files("testkit", ".rs"))
    {
        if !rel(&path).contains("/src/") {
            continue;
        }
        // Unit tests (the `#[cfg(test)]` module at the end) may use host
        // paths as data.
        let text = read(&path);
        let code = text.split("\n#[cfg(test)]").next().unwrap_or_default();
        for (i, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") || line.contains("tidy: allow-host-path") {
                continue;
            }
            for lit in HOST_PATHS {
                if line.contains(lit) {
                    offenders.push(format!("{}:{}: {}", rel(&path), i + 1, line.trim()));
                }
            }
        }
    }
    assert_none(
        "no host path literals in library code (roots are parameters)",
        offenders,
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let ci = read(&root().join(".ci/run"));
    let commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("set "))
        .collect();
    assert_eq!(
        commands,
        ["cargo xtask ci"],
        ".ci/run must run exactly `cargo xtask ci`"
    );
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains("cargo xtask ci"),
        "README.md must show `cargo xtask ci`"
    );
    assert!(
        readme.contains("cargo xtask demo"),
        "README.md must show `cargo xtask demo`"
    );
}

#[test]
fn architecture_names_every_crate() {
    let arch = read(&root().join("ARCHITECTURE.md"));
    let mut offenders = Vec::new();
    for path in member_manifests() {
        let dir = path.parent().unwrap();
        let shown = rel(dir);
        if !arch.contains(&format!("`{shown}`")) {
            offenders.push(shown);
        }
    }
    assert_none(
        "ARCHITECTURE.md's code map names every member as `dir`",
        offenders,
    );
}

/// The code spans of `text`, in order.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Whether `span` is meant as a file or directory of the repository: it
/// starts with a top-level directory, or is a Rust file name.
fn names_a_path(span: &str) -> bool {
    const TOP: &[&str] = &[
        "crates/", "testkit/", "bins/", "xtask/", "deploy/", "docs/", ".ci/",
    ];
    !span.contains(|c: char| c.is_whitespace() || "*<>{}$".contains(c))
        && (TOP.iter().any(|t| span.starts_with(t)) || span.ends_with(".rs"))
}

#[test]
fn every_path_the_docs_map_names_exists() {
    let root = root();
    let mut offenders = Vec::new();
    for doc in ["ARCHITECTURE.md", "README.md"] {
        let text = read(&root.join(doc));
        // A bare `x.rs` belongs to the member the bullet is about.
        let mut member: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("- `") {
                member = rest
                    .split('`')
                    .next()
                    .filter(|m| {
                        m.starts_with("crates/")
                            || m.starts_with("testkit/")
                            || m.starts_with("bins/")
                            || *m == "xtask"
                    })
                    .map(str::to_owned);
            } else if !line.starts_with("  ") {
                member = None;
            }
            for span in code_spans(line) {
                if !names_a_path(span) {
                    continue;
                }
                let span = span.trim_end_matches('/');
                let found = root.join(span).exists() || {
                    // A file name, or a path from inside a member: in the
                    // member the bullet is about, or else anywhere.
                    let base = member
                        .as_deref()
                        .filter(|_| !span.contains('/'))
                        .unwrap_or(".");
                    !files(base, &format!("/{span}")).is_empty()
                };
                if !found {
                    offenders.push(format!(
                        "{doc}: `{span}` ({})",
                        member.as_deref().unwrap_or("-")
                    ));
                }
            }
        }
    }
    assert_none(
        "every path ARCHITECTURE.md and README.md name exists",
        offenders,
    );
}

#[test]
fn every_fuzz_target_has_a_corpus_replayed_on_stable() {
    let mut offenders = Vec::new();
    for target in files("crates", ".rs") {
        let shown = rel(&target);
        let Some((krate, name)) = shown
            .strip_prefix("crates/")
            .and_then(|s| s.split_once("/fuzz/fuzz_targets/"))
        else {
            continue;
        };
        let name = name.trim_end_matches(".rs");
        let corpus = root().join(format!("crates/{krate}/fuzz/corpus/{name}"));
        let seeds = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        if seeds == 0 {
            offenders.push(format!("{shown}: no seeds in {}", rel(&corpus)));
        }
        let needle = format!("fuzz/corpus/{name}");
        let replayed = files(&format!("crates/{krate}/tests"), ".rs")
            .iter()
            .any(|t| read(t).contains(&needle));
        if !replayed {
            offenders.push(format!(
                "{shown}: no test in crates/{krate}/tests replays {needle}"
            ));
        }
    }
    assert_none("fuzz corpora are replayed by stable tests", offenders);
}

#[test]
fn unix_socket_grpc_servers_accept_any_authority() {
    // A tonic server fed a bare `UnixListenerStream` refuses the
    // `:authority` of kubelets before 1.26 and of grpc-core clients; every
    // server of ours goes through `devplugin_api::uds::incoming`.
    let mut offenders = Vec::new();
    for dir in ["crates", "testkit", "bins"] {
        for path in files(dir, ".rs") {
            let r = rel(&path);
            // `uds::incoming` itself wraps the listener.
            if !r.contains("/src/") || r == "crates/kubelet-plumbing/src/uds.rs" {
                continue;
            }
            let text = read(&path);
            let code = text.split("\n#[cfg(test)]").next().unwrap_or_default();
            for (i, line) in code.lines().enumerate() {
                if line.contains("UnixListenerStream::new") && !line.trim_start().starts_with("//")
                {
                    offenders.push(format!("{r}:{}: {}", i + 1, line.trim()));
                }
            }
        }
    }
    assert_none(
        "Unix-socket gRPC servers use kubelet_plumbing::uds::incoming (any :authority)",
        offenders,
    );
}

#[test]
fn pure_modules_do_not_depend_on_the_command_line() {
    // The plugin's plan and the labeller's decision logic are pure: flags
    // are mapped onto them at the edge (cli.rs), not derived on them.
    let offenders: Vec<String> = [
        "bins/intel-gpu-plugin/src/plan.rs",
        "crates/node-labeler/src/desired.rs",
        "crates/node-labeler/src/reconcile.rs",
    ]
    .iter()
    .filter(|p| read(&root().join(p)).contains("clap"))
    .map(|p| (*p).to_owned())
    .collect();
    assert_none("pure modules do not mention clap", offenders);
}
