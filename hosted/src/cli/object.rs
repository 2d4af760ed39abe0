//! qemu-img's `--object TYPE,id=ID,...`: the objects a command defines before it opens anything. Secrets
//! (`secret`, with `data` or `file` and `format=raw|base64`) are checked and their files read as QEMU reads
//! them (their values kept for the images that name them: [`secret`]); `throttle-group` is
//! accepted; object types qemu-img cannot create, unknown types and every mistake get QEMU's message.

use crate::cli::{Fail, fail};

/// The objects one command line defines.
#[derive(Debug, Default)]
pub(crate) struct Objects {
    /// The ids defined so far, with whether each is a secret.
    ids: Vec<(String, bool)>,
}

/// Object types QEMU's tools can create but that the engine has no use for.
const ACCEPTED: [&str; 1] = ["throttle-group"];
/// Object types QEMU knows but its tools refuse to create.
const NOT_IN_TOOLS: [&str; 3] = ["iothread", "rng-random", "rng-builtin"];
/// The keys a secret takes.
const SECRET_KEYS: [&str; 8] = [
    "qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded",
];

/// An identifier as QEMU wants one: letters, digits, '-', '.', '_', starting with a letter.
fn is_identifier(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The secrets defined by this process's command line: id and value.
static SECRETS: std::sync::Mutex<Vec<(String, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());

/// The value of the secret `id`, if one was defined.
pub(crate) fn secret(id: &str) -> Option<Vec<u8>> {
    SECRETS
        .lock()
        .ok()?
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, v)| v.clone())
}

impl Objects {
    /// Defines the object `spec` describes (the value of one `--object`).
    pub(crate) fn add(&mut self, spec: &str) -> Result<(), Fail> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (i, item) in spec.split(',').enumerate() {
            if item.is_empty() && spec.is_empty() {
                break;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k, v),
                None if i == 0 => ("qom-type", item),
                None => return Err(fail(format!("Invalid parameter '{item}'"))),
            };
            pairs.retain(|(key, _)| key != k);
            pairs.push((k.to_string(), v.to_string()));
        }
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(kind) = get("qom-type") else {
            return Err(fail("Parameter 'qom-type' is missing"));
        };
        let secret = kind == "secret";
        if !secret && !ACCEPTED.contains(&kind) {
            return Err(fail(if NOT_IN_TOOLS.contains(&kind) {
                format!("invalid object type: {kind}")
            } else {
                format!("Parameter 'qom-type' does not accept value '{kind}'")
            }));
        }
        let Some(id) = get("id") else {
            return Err(fail("Parameter 'id' is missing"));
        };
        if !is_identifier(id) {
            return Err(fail(
                "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', \
                 '.', '_', starting with a letter.",
            ));
        }
        let mut value = Vec::new();
        if secret {
            if let Some((k, _)) = pairs
                .iter()
                .find(|(k, _)| !SECRET_KEYS.contains(&k.as_str()))
            {
                return Err(fail(format!("Parameter '{k}' is unexpected")));
            }
            match get("format") {
                None | Some("raw" | "base64") => {}
                Some(other) => {
                    return Err(fail(format!(
                        "Parameter 'format' does not accept value '{other}'"
                    )));
                }
            };
            match (get("data"), get("file")) {
                (Some(_), Some(_)) => {
                    return Err(fail("'file' and 'data' are mutually exclusive"));
                }
                (None, None) => return Err(fail("Either 'file' or 'data' must be provided")),
                (Some(d), None) => value = d.as_bytes().to_vec(),
                (None, Some(f)) => {
                    value = std::fs::read(f).map_err(|e| {
                        let why = crate::disk::DiskError::from(e);
                        fail(format!(
                            "Unable to read {f}: Failed to open file “{f}”: {why}"
                        ))
                    })?;
                }
            }
            if get("format") == Some("base64") {
                use base64::Engine;
                value = base64::engine::general_purpose::STANDARD
                    .decode(&value)
                    .map_err(|_| fail("Invalid base64 data"))?;
            }
            if let Some(k) = get("keyid") {
                return Err(fail(
                    if self.ids.iter().any(|(i, secret)| i == k && *secret) {
                        "Secrets encrypted with another secret are not supported by this tool"
                            .to_string()
                    } else {
                        format!("No secret with id '{k}'")
                    },
                ));
            }
        }
        if self.ids.iter().any(|(i, _)| i == id) {
            return Err(fail(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        self.ids.push((id.to_string(), secret));
        if secret && let Ok(mut s) = SECRETS.lock() {
            s.retain(|(i, _)| i != id);
            s.push((id.to_string(), value));
        }
        Ok(())
    }
}
