//! `qemu-img snapshot`: lists, creates, applies and deletes internal snapshots with qemu-img's arguments, table,
//! messages and exit codes.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use lexopt::Arg;

use crate::cli::info::{snapshot_table_header, snapshot_table_row};
use crate::cli::{
    Fail, PROBED_RAW_WARNING, fail, no_value, open_error, opt_error, os_to_string, print_help,
    resolve_image, unknown_option, value,
};
use crate::open;

/// What the command does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// qemu-img keeps 255 bytes of a new snapshot's name (its name buffer is 256 bytes).
const NAME_MAX: usize = 255;

pub(super) fn cmd_snapshot(
    p: &mut lexopt::Parser,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Fail> {
    let (mut fmt, mut image_opts, mut quiet) = (None, false, false);
    let mut action: Option<Action> = None;
    let mut files = Vec::new();
    let set = |a: Action, action: &mut Option<Action>| {
        if action.is_some() {
            return Err(fail("Cannot mix '-l', '-a', '-c', '-d'"));
        }
        *action = Some(a);
        Ok(())
    };
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("snapshot", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("snapshot", p)?)?,
            Arg::Short('h') => return print_help("snapshot", out),
            Arg::Long("help") => {
                no_value("snapshot", "help", p)?;
                return print_help("snapshot", out);
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("snapshot", p)?),
            Arg::Short('q') | Arg::Long("quiet") => quiet = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Short('l') | Arg::Long("list") => set(Action::List, &mut action)?,
            Arg::Short('c') | Arg::Long("create") => {
                set(Action::Create(value("snapshot", p)?), &mut action)?;
            }
            Arg::Short('a') | Arg::Long("apply") => {
                set(Action::Apply(value("snapshot", p)?), &mut action)?;
            }
            Arg::Short('d') | Arg::Long("delete") => {
                set(Action::Delete(value("snapshot", p)?), &mut action)?;
            }
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("snapshot", other)),
        }
    }
    let file = match files.as_slice() {
        [f] => f.clone(),
        [] => return Err(fail("Expecting one image file name")),
        _ => return Err(fail("Expecting one image file name")),
    };
    let (path, fmt) = resolve_image(&file, image_opts, fmt.as_deref())?;
    let action = action.unwrap_or(Action::List);
    if action == Action::List {
        let opened = open::open_disk(&path, fmt.as_deref()).map_err(|e| open_error(&file, e))?;
        let snapshots = opened
            .chain
            .first()
            .map(|i| i.snapshots.clone())
            .unwrap_or_default();
        if !snapshots.is_empty() {
            let mut text = format!("Snapshot list:\n{}\n", snapshot_table_header());
            for s in &snapshots {
                text.push_str(&snapshot_table_row(s));
                text.push('\n');
            }
            out.write_all(text.as_bytes())
                .map_err(|e| fail(e.to_string()))?;
        }
        return Ok(0);
    }
    let mut opened =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(&file, e))?;
    if fmt.is_none() && opened.chain.first().is_some_and(|i| i.format == "raw") {
        let _ = writeln!(err, "{}", PROBED_RAW_WARNING.replace("{}", &path));
    }
    let done = match &action {
        Action::Create(name) => {
            let mut end = name.len().min(NAME_MAX);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            opened
                .disk
                .create_snapshot(
                    &name[..end],
                    (now.as_secs() as u32, now.subsec_micros() * 1000),
                )
                .map_err(|e| format!("Could not create snapshot '{name}': {e}"))
        }
        Action::Delete(name) => opened
            .disk
            .delete_snapshot(name)
            .map_err(|e| format!("Could not delete snapshot '{name}': {e}")),
        Action::Apply(name) => opened
            .disk
            .apply_snapshot(name)
            .map_err(|e| format!("Could not apply snapshot '{name}': {e}")),
        Action::List => Ok(()),
    };
    let closed = opened.disk.close();
    done.map_err(fail)?;
    closed.map_err(|e| fail(e.to_string()))?;
    let _ = quiet;
    Ok(0)
}
