//! A tiny JSON tree that prints the way QEMU prints its QAPI objects.
//!
//! QEMU builds its output as a `QDict`, a hash table of 512 buckets, and prints a dictionary bucket by bucket;
//! inside a bucket the most recently inserted key comes first. So the order of the keys in `qemu-img info
//! --output=json` (and in the human "Format specific information" block, which walks the same dictionaries) is
//! the order of the buckets their names hash to. [`Value::Object`] keeps the keys in insertion order (insert them
//! in the order of the QAPI schema) and [`qdict_order`] gives the order QEMU prints them in.
//!
//! The pretty printer follows QEMU's layout: four spaces a level, `"key": value`, `,` + newline between
//! members, and an empty container printed as its opening bracket, a newline and the closing bracket at the
//! container's own indentation.

use std::fmt::Write as _;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `true` / `false`.
    Bool(bool),
    /// A signed integer (QAPI `int`).
    Int(i64),
    /// An unsigned integer (QAPI `uint64`/`size`).
    UInt(u64),
    /// A string.
    Str(String),
    /// A list.
    Array(Vec<Value>),
    /// A dictionary, keys in insertion order (see [`qdict_order`] for the printing order).
    Object(Vec<(String, Value)>),
}

/// Number of buckets of QEMU's `QDict`.
const QDICT_BUCKETS: u32 = 512;

/// The hash QEMU's `QDict` uses to pick a key's bucket (from the TDB database).
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// Indices of `members` in the order QEMU prints a `QDict` whose keys were inserted in slice order.
pub fn qdict_order(members: &[(String, Value)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..members.len()).collect();
    // Bucket ascending; within a bucket, last inserted first.
    idx.sort_by_key(|&i| (qdict_bucket(&members[i].0), std::cmp::Reverse(i)));
    idx
}

impl Value {
    /// Shorthand for a string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// Pretty-prints the value the way `qobject_to_json_pretty` does (no trailing newline).
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write_pretty(&mut out, 0);
        out
    }

    fn write_pretty(&self, out: &mut String, level: usize) {
        match self {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            Value::Str(s) => write_json_string(out, s),
            Value::Array(items) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    newline_indent(out, level + 1);
                    item.write_pretty(out, level + 1);
                }
                newline_indent(out, level);
                out.push(']');
            }
            Value::Object(members) => {
                out.push('{');
                for (n, i) in qdict_order(members).into_iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    newline_indent(out, level + 1);
                    let (key, value) = &members[i];
                    write_json_string(out, key);
                    out.push_str(": ");
                    value.write_pretty(out, level + 1);
                }
                newline_indent(out, level);
                out.push('}');
            }
        }
    }

    /// The value as QEMU's human dump prints a scalar (`None` for lists and dictionaries).
    fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Bool(b) => Some(if *b { "true" } else { "false" }.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::UInt(u) => Some(u.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Array(_) | Value::Object(_) => None,
        }
    }

    /// Looks a key up in an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

fn newline_indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

/// Writes `s` as a JSON string the way QEMU's JSON writer escapes it.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                // QEMU escapes everything outside printable ASCII as \uXXXX (UTF-16 surrogates above the BMP).
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Dumps a dictionary the way qemu-img's human output prints format-specific data: one `key: value` line per
/// member in `QDict` order, `-` in keys shown as spaces, nested containers on the following lines four spaces
/// deeper, list members as `[n]`.
pub fn human_dump_object(out: &mut String, members: &[(String, Value)], indent: usize) {
    for i in qdict_order(members) {
        let (key, value) = &members[i];
        let key = key.replace('-', " ");
        human_dump_entry(out, &key, value, indent);
    }
}

fn human_dump_entry(out: &mut String, label: &str, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value.scalar_text() {
        Some(text) => {
            let _ = writeln!(out, "{pad}{label}: {text}");
        }
        None => {
            let _ = writeln!(out, "{pad}{label}:");
            match value {
                Value::Object(m) => human_dump_object(out, m, indent + 4),
                Value::Array(items) => {
                    for (n, item) in items.iter().enumerate() {
                        human_dump_entry(out, &format!("[{n}]"), item, indent + 4);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(keys: &[&str]) -> Value {
        Value::Object(
            keys.iter()
                .map(|k| (k.to_string(), Value::Int(1)))
                .collect(),
        )
    }

    #[test]
    fn bucket_order_matches_qemu_image_info() {
        // Insertion order of QAPI's BlockNodeInfo/ImageInfo/BlockGraphInfo; expected order as qemu-img 10 prints.
        let v = obj(&[
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "snapshots",
            "format-specific",
            "children",
        ]);
        let Value::Object(m) = &v else { unreachable!() };
        let order: Vec<&str> = qdict_order(m)
            .into_iter()
            .map(|i| m[i].0.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "children",
                "backing-filename-format",
                "snapshots",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag",
            ]
        );
    }

    #[test]
    fn pretty_layout_with_empty_containers() {
        let v = Value::Object(vec![
            ("a".into(), Value::Array(vec![])),
            ("b".into(), Value::Object(vec![])),
        ]);
        // "a" and "b" land in buckets in this order.
        let text = v.to_pretty();
        let expected_ab = "{\n    \"a\": [\n    ],\n    \"b\": {\n    }\n}";
        let expected_ba = "{\n    \"b\": {\n    },\n    \"a\": [\n    ]\n}";
        if qdict_bucket("a") < qdict_bucket("b") {
            assert_eq!(text, expected_ab);
        } else {
            assert_eq!(text, expected_ba);
        }
        let nested = Value::Array(vec![Value::Array(vec![
            Value::str("x\"y"),
            Value::Bool(true),
        ])]);
        assert_eq!(
            nested.to_pretty(),
            "[\n    [\n        \"x\\\"y\",\n        true\n    ]\n]"
        );
    }

    #[test]
    fn human_dump_lists_and_dashes() {
        let v = vec![(
            "bitmaps".to_string(),
            Value::Array(vec![Value::Object(vec![
                ("name".into(), Value::str("bm0")),
                ("granularity".into(), Value::UInt(65536)),
                ("flags".into(), Value::Array(vec![Value::str("auto")])),
            ])]),
        )];
        let mut out = String::new();
        human_dump_object(&mut out, &v, 4);
        assert_eq!(
            out,
            "    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: bm0\n            granularity: 65536\n"
        );
    }
}
