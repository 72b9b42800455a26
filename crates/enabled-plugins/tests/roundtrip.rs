//! Rendering and reading back: property tests, and byte equality with what
//! Python (StarlingX's Ansible) writes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

use enabled_plugins::{EnabledPlugins, Label, parse, render_starlingx};
use proptest::prelude::*;

fn label_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9]([-a-zA-Z0-9_.]{0,20}[a-zA-Z0-9])?"
}

fn label() -> impl Strategy<Value = Label> {
    (
        proptest::option::of("[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,5}){0,2}"),
        label_name(),
        proptest::option::of(label_name()),
    )
        .prop_map(|(prefix, name, value)| {
            let key = match prefix {
                Some(p) => format!("{p}/{name}"),
                None => name,
            };
            Label::new(&key, value.as_deref().unwrap_or("")).unwrap()
        })
}

/// Plugin names: the known ones and their aliases, label-key-like names,
/// and free text (the object form allows it) including non-ASCII and
/// characters JSON must escape.
fn plugin_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("intel-gpu-plugin".to_owned()),
        Just("intelgpu".to_owned()),
        Just("intelqat".to_owned()),
        Just("intel-fpga-plugin".to_owned()),
        label_name(),
        "[^\\p{Cc}\\s][^\\p{Cc}]{0,10}[^\\p{Cc}\\s]",
    ]
}

fn plugin_set() -> impl Strategy<Value = EnabledPlugins> {
    proptest::collection::vec((plugin_name(), label()), 0..8).prop_map(|entries| {
        let mut set = EnabledPlugins::new();
        for (name, label) in entries {
            // Conflicting entries are simply not added.
            let _ = set.insert(&name, label);
        }
        set
    })
}

proptest! {
    #[test]
    fn reading_what_we_render_gives_the_same_set(set in plugin_set()) {
        let text = render_starlingx(&set);
        prop_assert!(!text.contains('\n'));
        prop_assert!(text.is_ascii());
        let back = parse("rendered", text.as_bytes()).unwrap();
        prop_assert_eq!(&back, &set);
        prop_assert_eq!(render_starlingx(&back), text);
    }

    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse("random", &bytes);
    }

    #[test]
    fn any_text_parses_or_fails_cleanly(text in "\\PC{0,64}") {
        let _ = parse("random", text.as_bytes());
        let _ = parse("random", format!("[{text}]").as_bytes());
        let _ = parse("random", format!("{{{text}}}").as_bytes());
    }
}

/// What StarlingX's Ansible wrote (`k8s_plugins | to_json`, i.e. Python's
/// `json.dumps`), byte for byte, and how it must read.
#[test]
fn bytes_starlingx_wrote_read_as_expected() {
    type Case<'a> = (&'a [u8], &'a [(&'a str, &'a str)]);
    let cases: &[Case<'_>] = &[
        (br#"{"intel-gpu-plugin": "intelgpu=enabled"}"#, &[("intel-gpu-plugin", "intelgpu=enabled")]),
        (
            br#"{"intel-qat-plugin": "intelqat=enabled", "intel-gpu-plugin": "intelgpu=enabled"}"#,
            &[("intel-gpu-plugin", "intelgpu=enabled"), ("intel-qat-plugin", "intelqat=enabled")],
        ),
        (
            br#"{"intel-fpga-plugin": "intelfpga=enabled", "intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#,
            &[
                ("intel-fpga-plugin", "intelfpga=enabled"),
                ("intel-gpu-plugin", "intelgpu=enabled"),
                ("intel-qat-plugin", "intelqat=enabled"),
            ],
        ),
        (br#"["intelgpu", "intelqat"]"#, &[("intel-gpu-plugin", "intelgpu=enabled"), ("intel-qat-plugin", "intelqat=enabled")]),
        (b"{}", &[]),
    ];
    for (bytes, expected) in cases {
        let set = parse("ansible", bytes).unwrap();
        let got: Vec<(String, String)> = set
            .iter()
            .map(|(n, l)| (n.to_owned(), l.to_string()))
            .collect();
        let want: Vec<(String, String)> = expected
            .iter()
            .map(|(n, l)| ((*n).to_owned(), (*l).to_owned()))
            .collect();
        assert_eq!(got, want, "{}", String::from_utf8_lossy(bytes));
    }
}

/// Our renderer's bytes equal Python's `json.dumps(d, sort_keys=True)` for
/// tricky names (escapes, non-ASCII, astral characters, ordering). Skips,
/// saying so, when no `python3` is on the machine.
#[test]
fn renderer_matches_python_json_dumps() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED renderer_matches_python_json_dumps: python3 is not installed");
        return;
    }
    let names = [
        "intel-gpu-plugin",
        "intelqat",
        "Zeta",
        "alpha",
        "a\"quote",
        "back\\slash",
        "é-accent",
        "日本",
        "emoji😀",
        "~tilde",
        "Ωmega",
        "\u{ffff}end",
    ];
    let mut set = EnabledPlugins::new();
    for (i, n) in names.iter().enumerate() {
        set.insert(n, Label::new(&format!("k{i}"), "enabled").unwrap())
            .unwrap();
    }
    let ours = render_starlingx(&set);
    let dict: Vec<(String, String)> = set
        .iter()
        .map(|(n, l)| (n.to_owned(), l.to_string()))
        .collect();
    let script = "import json,sys; d=dict(json.load(sys.stdin)); sys.stdout.write(json.dumps(d, sort_keys=True))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_string(&dict).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(ours, String::from_utf8(out.stdout).unwrap());
}
