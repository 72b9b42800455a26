//! Reading the three forms of the enabled-plugins content.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::label::{Label, LabelError};
use crate::model::{EnabledPlugins, InsertError, check_entry, default_label};

/// The largest content accepted, in bytes.
pub const MAX_SIZE: usize = 64 * 1024;

/// The form a content was written in, detected from its first
/// non-blank character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Nothing but white space: nothing is enabled.
    Empty,
    /// A JSON object, plugin name → `key=value` label (StarlingX's form).
    JsonObject,
    /// A JSON array of plugin names (label `name=enabled`).
    JsonArray,
    /// One plugin name per line; blank lines and `#` comments ignored.
    Lines,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::JsonObject => "JSON object",
            Self::JsonArray => "JSON array",
            Self::Lines => "one entry per line",
        })
    }
}

/// Where in the content something was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// 1-based line and column (in characters).
    Line {
        /// Line number.
        line: usize,
        /// Column number.
        column: usize,
    },
    /// A JSON path such as `$["intel-gpu-plugin"]` or `$[2]`.
    JsonPath(String),
    /// A byte offset from the start.
    Byte(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line { line, column } => write!(f, "line {line}, column {column}"),
            Self::JsonPath(p) => write!(f, "at {p}"),
            Self::Byte(b) => write!(f, "byte {b}"),
        }
    }
}

/// Content that is not a valid enabled-plugins list. Every variant names
/// the source (a path or a ConfigMap) and, where there is one, the
/// position, and quotes the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The content exceeds [`MAX_SIZE`].
    #[error("{origin}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// Where the content came from.
        origin: String,
        /// Its size, or at least this many bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The content is not UTF-8.
    #[error("{origin}: not UTF-8 at byte {offset}")]
    NotUtf8 {
        /// Where the content came from.
        origin: String,
        /// The first invalid byte.
        offset: usize,
    },
    /// The content starts like JSON but is not valid JSON.
    #[error("{origin}: invalid JSON at line {line}, column {column}: {message}")]
    InvalidJson {
        /// Where the content came from.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the JSON reader reported.
        message: String,
    },
    /// A JSON value of the wrong type (e.g. a number where a name belongs).
    #[error("{origin} {at}: expected {expected}, found {found}")]
    WrongType {
        /// Where the content came from.
        origin: String,
        /// Where in it.
        at: Position,
        /// What belongs there.
        expected: &'static str,
        /// What is there, quoted.
        found: String,
    },
    /// A plugin name that cannot be used.
    #[error("{origin} {at}: invalid plugin name {name:?}: {reason}")]
    InvalidName {
        /// Where the content came from.
        origin: String,
        /// Where in it.
        at: Position,
        /// The offending name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A label that is not `key=value` or not valid label syntax.
    #[error("{origin} {at}: {error}")]
    InvalidLabel {
        /// Where the content came from.
        origin: String,
        /// Where in it.
        at: Position,
        /// What is wrong with the label (quotes it).
        error: LabelError,
    },
    /// A plugin enabled twice, or two plugins claiming one label key
    /// (never [`InsertError::InvalidName`]: that is [`ParseError::InvalidName`]).
    #[error("{origin} {at}: {error}")]
    Conflict {
        /// Where the content came from.
        origin: String,
        /// Where in it (the second occurrence).
        at: Position,
        /// The conflict (names both sides).
        error: Box<InsertError>,
    },
}

/// Whether content is empty or only white space (a byte-order mark
/// included): no decision can come from it. Files in this state are being
/// written; [`crate::read_file`] reports them as [`crate::ReadError::Blank`].
#[must_use]
pub fn is_blank(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// Detects the form of `text` from its first non-blank character.
#[must_use]
pub fn detect_form(text: &str) -> Form {
    match text.trim_start().chars().next() {
        None => Form::Empty,
        Some('{') => Form::JsonObject,
        Some('[') => Form::JsonArray,
        Some(_) => Form::Lines,
    }
}

/// Parses enabled-plugins content in any of its forms. `origin` names where
/// it came from in error messages. A UTF-8 byte-order mark is skipped.
///
/// # Errors
/// See [`ParseError`]: the first problem found, in document order.
pub fn parse(origin: &str, bytes: &[u8]) -> Result<EnabledPlugins, ParseError> {
    let origin = origin.to_owned();
    if bytes.len() > MAX_SIZE {
        return Err(ParseError::TooLarge {
            origin,
            size: bytes.len(),
            limit: MAX_SIZE,
        });
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Err(ParseError::NotUtf8 {
                origin,
                offset: e.valid_up_to(),
            });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut ctx = Context {
        origin,
        set: EnabledPlugins::new(),
    };
    match detect_form(text) {
        Form::Empty => {}
        Form::JsonObject | Form::JsonArray => ctx.json(text)?,
        Form::Lines => ctx.lines(text)?,
    }
    Ok(ctx.set)
}

struct Context {
    origin: String,
    set: EnabledPlugins,
}

impl Context {
    fn json(&mut self, text: &str) -> Result<(), ParseError> {
        let top: Top = serde_json::from_str(text).map_err(|e| ParseError::InvalidJson {
            origin: self.origin.clone(),
            line: e.line(),
            column: e.column(),
            message: strip_position(&e.to_string()),
        })?;
        match top {
            Top::Object(entries) => {
                for (name, value) in entries {
                    let at = Position::JsonPath(format!("$[{}]", quote(&name)));
                    let serde_json::Value::String(text) = value else {
                        return Err(self.wrong_type(at, "a label \"key=value\"", &value));
                    };
                    let label = Label::parse(&text)
                        .map_err(|error| self.invalid_label(at.clone(), error))?;
                    self.insert(at, &name, label)?;
                }
            }
            Top::Array(items) => {
                for (i, value) in items.into_iter().enumerate() {
                    let at = Position::JsonPath(format!("$[{i}]"));
                    let serde_json::Value::String(name) = value else {
                        return Err(self.wrong_type(at, "a plugin name (a string)", &value));
                    };
                    self.entry(at, &name)?;
                }
            }
        }
        Ok(())
    }

    fn lines(&mut self, text: &str) -> Result<(), ParseError> {
        for (i, line) in text.lines().enumerate() {
            let content = match line.find('#') {
                Some(hash) => &line[..hash],
                None => line,
            };
            let entry = content.trim();
            if entry.is_empty() {
                continue;
            }
            let leading = content.len() - content.trim_start().len();
            let column = content[..leading].chars().count() + 1;
            let at = Position::Line {
                line: i + 1,
                column,
            };
            self.entry(at, entry)?;
        }
        Ok(())
    }

    fn entry(&mut self, at: Position, name: &str) -> Result<(), ParseError> {
        check_entry(name).map_err(|reason| self.invalid_name(at.clone(), name, reason))?;
        let label = default_label(name).map_err(|error| self.invalid_label(at.clone(), error))?;
        self.insert(at, name, label)
    }

    fn insert(&mut self, at: Position, name: &str, label: Label) -> Result<(), ParseError> {
        self.set.insert(name, label).map_err(|error| match error {
            InsertError::InvalidName { name, reason } => self.invalid_name(at, &name, reason),
            error => ParseError::Conflict {
                origin: self.origin.clone(),
                at,
                error: Box::new(error),
            },
        })
    }

    fn invalid_name(&self, at: Position, name: &str, reason: &'static str) -> ParseError {
        ParseError::InvalidName {
            origin: self.origin.clone(),
            at,
            name: name.to_owned(),
            reason,
        }
    }

    fn invalid_label(&self, at: Position, error: LabelError) -> ParseError {
        ParseError::InvalidLabel {
            origin: self.origin.clone(),
            at,
            error,
        }
    }

    fn wrong_type(
        &self,
        at: Position,
        expected: &'static str,
        found: &serde_json::Value,
    ) -> ParseError {
        let mut found = found.to_string();
        if found.len() > 80 {
            let mut cut = 77;
            while !found.is_char_boundary(cut) {
                cut -= 1;
            }
            found.truncate(cut);
            found.push_str("...");
        }
        ParseError::WrongType {
            origin: self.origin.clone(),
            at,
            expected,
            found,
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// serde_json appends " at line L column C"; we report those separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The top-level JSON value, keeping duplicate object keys in order (a
/// plain map would silently keep only the last).
enum Top {
    Object(Vec<(String, serde_json::Value)>),
    Array(Vec<serde_json::Value>),
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = Top;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object or array")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Top::Object(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<serde_json::Value>()? {
                    items.push(item);
                }
                Ok(Top::Array(items))
            }
        }
        d.deserialize_any(TopVisitor)
    }
}
