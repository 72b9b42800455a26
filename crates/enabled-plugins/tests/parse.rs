//! Every form, alias and error, table-driven through one `check` helper.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use enabled_plugins::{Form, MAX_SIZE, ParseError, detect_form, parse, render_starlingx};

/// Parses `input` and compares with `expected`: `Ok(normalised StarlingX
/// form)` or `Err(the whole error message)`.
#[track_caller]
fn check(input: &str, expected: Result<&str, &str>) {
    check_bytes(input.as_bytes(), expected);
}

#[track_caller]
fn check_bytes(input: &[u8], expected: Result<&str, &str>) {
    let got = parse("f", input)
        .map(|set| render_starlingx(&set))
        .map_err(|e| e.to_string());
    assert_eq!(
        got.as_deref().map_err(String::as_str),
        expected,
        "input: {:?}",
        String::from_utf8_lossy(input)
    );
}

const GPU: &str = r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#;

#[test]
fn starlingx_object_form() {
    check(r#"{"intel-gpu-plugin": "intelgpu=enabled"}"#, Ok(GPU));
    check(r#"{"intel-gpu-plugin":"intelgpu=enabled"}"#, Ok(GPU));
    check("{\"intel-gpu-plugin\": \"intelgpu=enabled\"}\n", Ok(GPU));
    check(
        r#"{"intel-qat-plugin": "intelqat=enabled", "intel-gpu-plugin": "intelgpu=enabled"}"#,
        Ok(r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#),
    );
    // Aliases as keys, and any label.
    check(
        r#"{"intelgpu": "gpu.example.com/enabled=yes"}"#,
        Ok(r#"{"intel-gpu-plugin": "gpu.example.com/enabled=yes"}"#),
    );
    check(
        r#"{"sriovdp": "sriovdp=enabled"}"#,
        Ok(r#"{"sriovdp": "sriovdp=enabled"}"#),
    );
    check("{}", Ok("{}"));
    check(
        " \n {\n  \"intel-gpu-plugin\" : \"intelgpu=enabled\"\n}\n",
        Ok(GPU),
    );
}

#[test]
fn array_form() {
    check(
        r#"["intelgpu", "intelqat"]"#,
        Ok(r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#),
    );
    check(r#"["intel-gpu-plugin"]"#, Ok(GPU));
    check(
        r#"["intelfpga"]"#,
        Ok(r#"{"intel-fpga-plugin": "intelfpga=enabled"}"#),
    );
    check(r#"["sriovdp"]"#, Ok(r#"{"sriovdp": "sriovdp=enabled"}"#));
    check("[]", Ok("{}"));
}

#[test]
fn lines_form() {
    check("intelgpu", Ok(GPU));
    check("intel-gpu-plugin\n", Ok(GPU));
    check(
        "# plugins\n\n  intelgpu   # the GPU\n\r\nintelqat\r\n",
        Ok(r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-qat-plugin": "intelqat=enabled"}"#),
    );
    check("# nothing enabled\n", Ok("{}"));
}

#[test]
fn empty_content_means_nothing_enabled() {
    check("", Ok("{}"));
    check(" \n\t\n", Ok("{}"));
    check("\u{feff}", Ok("{}"));
}

#[test]
fn byte_order_mark_is_accepted() {
    check(
        "\u{feff}{\"intel-gpu-plugin\": \"intelgpu=enabled\"}",
        Ok(GPU),
    );
    check("\u{feff}intelgpu\n", Ok(GPU));
}

#[test]
fn invalid_json_names_line_and_column() {
    check(
        r#"{"intel-gpu-plugin": "intelgpu=enabled""#,
        Err("f: invalid JSON at line 1, column 39: EOF while parsing an object"),
    );
    check(
        "{\n\"a\": \"b=c\",\n}",
        Err("f: invalid JSON at line 3, column 1: trailing comma"),
    );
    check(
        r#"["intelgpu",]"#,
        Err("f: invalid JSON at line 1, column 13: trailing comma"),
    );
    check(
        r#"{"a": "b=c"} x"#,
        Err("f: invalid JSON at line 1, column 14: trailing characters"),
    );
}

#[test]
fn wrong_json_types_are_named_with_their_path() {
    check(
        r#"{"intel-gpu-plugin": true}"#,
        Err(r#"f at $["intel-gpu-plugin"]: expected a label "key=value", found true"#),
    );
    check(
        r#"{"intel-gpu-plugin": {"a": 1}}"#,
        Err(r#"f at $["intel-gpu-plugin"]: expected a label "key=value", found {"a":1}"#),
    );
    check(
        r#"["intelgpu", 7]"#,
        Err("f at $[1]: expected a plugin name (a string), found 7"),
    );
    check(
        r#"[["intelgpu"]]"#,
        Err(r#"f at $[0]: expected a plugin name (a string), found ["intelgpu"]"#),
    );
}

#[test]
fn labels_must_be_key_value_with_valid_syntax() {
    check(
        r#"{"intel-gpu-plugin": "intelgpu"}"#,
        Err(r#"f at $["intel-gpu-plugin"]: "intelgpu" is not a label of the form key=value"#),
    );
    check(
        r#"{"intel-gpu-plugin": "intel gpu=enabled"}"#,
        Err(
            r#"f at $["intel-gpu-plugin"]: invalid label key "intel gpu": only letters, digits, '-', '_' and '.' are allowed"#,
        ),
    );
    check(
        r#"{"intel-gpu-plugin": "intelgpu=-on"}"#,
        Err(
            r#"f at $["intel-gpu-plugin"]: invalid label value "-on": must start and end with a letter or digit"#,
        ),
    );
    check(
        r#"{"intel-gpu-plugin": "=enabled"}"#,
        Err(r#"f at $["intel-gpu-plugin"]: invalid label key "": the name part is empty"#),
    );
}

#[test]
fn entries_must_be_valid_label_keys() {
    check(
        "intel gpu\n",
        Err(
            r#"f line 1, column 1: invalid plugin name "intel gpu": only letters, digits, '-', '_' and '.' are allowed"#,
        ),
    );
    check(
        "intelgpu\n  -bad\n",
        Err(
            r#"f line 2, column 3: invalid plugin name "-bad": must start and end with a letter or digit"#,
        ),
    );
    check(
        r#"["intelgpu", ""]"#,
        Err(r#"f at $[1]: invalid plugin name "": the name part is empty"#),
    );
    check(
        r#"{"": "a=b"}"#,
        Err(r#"f at $[""]: invalid plugin name "": it is empty"#),
    );
    check(
        "{\"a\\tb\": \"a=b\"}",
        Err(r#"f at $["a\tb"]: invalid plugin name "a\tb": it has control characters"#),
    );
    check(
        r#"{" intelgpu": "a=b"}"#,
        Err(
            r#"f at $[" intelgpu"]: invalid plugin name " intelgpu": it has leading or trailing white space"#,
        ),
    );
}

#[test]
fn a_plugin_enabled_twice_is_rejected_aliases_included() {
    check(
        r#"{"intel-gpu-plugin": "intelgpu=enabled", "intel-gpu-plugin": "intelgpu=enabled"}"#,
        Err(r#"f at $["intel-gpu-plugin"]: plugin "intel-gpu-plugin" is enabled twice"#),
    );
    check(
        r#"["intelgpu", "intel-gpu-plugin"]"#,
        Err(r#"f at $[1]: plugin "intel-gpu-plugin" is enabled twice"#),
    );
    check(
        "intelqat\nintel-qat-plugin\n",
        Err(r#"f line 2, column 1: plugin "intel-qat-plugin" is enabled twice"#),
    );
    check(
        r#"{"intelgpu": "a=b", "intel-gpu-plugin": "a=b"}"#,
        Err(r#"f at $["intel-gpu-plugin"]: plugin "intel-gpu-plugin" is enabled twice"#),
    );
}

#[test]
fn two_plugins_claiming_one_label_key_differently_are_rejected() {
    check(
        r#"{"intel-gpu-plugin": "gpu=intel", "other-gpu-plugin": "gpu=other"}"#,
        Err(
            r#"f at $["other-gpu-plugin"]: plugins "intel-gpu-plugin" and "other-gpu-plugin" both set label key "gpu", to "intel" and "other""#,
        ),
    );
    // The same label for two plugins is not a conflict.
    check(
        r#"{"a": "accel=enabled", "b": "accel=enabled"}"#,
        Ok(r#"{"a": "accel=enabled", "b": "accel=enabled"}"#),
    );
}

#[test]
fn oversized_and_non_utf8_content() {
    let big = vec![b' '; MAX_SIZE + 1];
    check_bytes(&big, Err("f: larger than the limit of 65536 bytes"));
    let mut exact = vec![b' '; MAX_SIZE - 10];
    exact.extend_from_slice(b"intelgpu\n");
    check_bytes(&exact, Ok(GPU));
    check_bytes(b"intelgpu\n\xffintelqat", Err("f: not UTF-8 at byte 9"));
    check_bytes(
        b"{\"intel-gpu-plugin\": \"intelgpu=enabled\xc3\"}",
        Err("f: not UTF-8 at byte 38"),
    );
}

#[test]
fn form_detection() {
    assert_eq!(detect_form(""), Form::Empty);
    assert_eq!(detect_form("  {}"), Form::JsonObject);
    assert_eq!(detect_form("\n[]"), Form::JsonArray);
    assert_eq!(detect_form("intelgpu"), Form::Lines);
    assert_eq!(detect_form("# c\n{"), Form::Lines);
}

#[test]
fn errors_carry_structured_positions() {
    let err = parse("/etc/platform/enabled_kube_plugins", b"ok\nnot ok\n").unwrap_err();
    assert!(
        matches!(
            err,
            ParseError::InvalidName { at: enabled_plugins::Position::Line { line: 2, column: 1 }, ref origin, .. }
                if origin == "/etc/platform/enabled_kube_plugins"
        ),
        "{err:?}"
    );
}

#[test]
fn gpu_plugin_query() {
    let set = parse("f", br#"{"intel-qat-plugin": "intelqat=enabled"}"#).unwrap();
    assert_eq!(set.gpu_plugin(), None);
    let set = parse("f", br#"{"intelgpu": "accel=gpu"}"#).unwrap();
    let label = set.gpu_plugin().unwrap();
    assert_eq!((label.key(), label.value()), ("accel", "gpu"));
}
