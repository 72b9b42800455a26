//! Writing the StarlingX form, byte for byte as StarlingX's Ansible wrote it.

use std::fmt::Write as _;

use crate::model::EnabledPlugins;

/// Renders the set in the form StarlingX reads: a JSON object from plugin
/// name to `key=value` label, with the bytes of Python's
/// `json.dumps(d, sort_keys=True)` — one line, `", "` and `": "`
/// separators, keys in code-point order, non-ASCII escaped as `\uXXXX`,
/// no trailing newline. Files written by Ansible and by us compare equal.
#[must_use]
pub fn render_starlingx(set: &EnabledPlugins) -> String {
    let mut out = String::from("{");
    // The set iterates in byte order of UTF-8, which is code-point order,
    // which is Python's order for `sort_keys`.
    for (i, (name, label)) in set.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_python_json_string(&mut out, name);
        out.push_str(": ");
        push_python_json_string(&mut out, &label.to_string());
    }
    out.push('}');
    out
}

/// Appends `s` as Python's `json.dumps` (with `ensure_ascii=True`) writes a
/// string.
fn push_python_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='\u{7e}' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_escapes() {
        let mut out = String::new();
        push_python_json_string(&mut out, "a\"b\\c\nd\u{1}é😀\u{7f}");
        assert_eq!(
            out,
            "\"a\\\"b\\\\c\\nd\\u0001\\u00e9\\ud83d\\ude00\\u007f\""
        );
    }
}
