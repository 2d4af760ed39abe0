//! `qemu-img bitmap`: persistent bitmaps added, removed, cleared, enabled, disabled and merged (from the same
//! image or, with `-b`, another one), the actions applied in the order given, with qemu-img's arguments,
//! checks, messages and exit codes. The bits, flags and granularities are qemu-img's; where the engine puts
//! the bitmap clusters can differ (qemu-img rewrites every bitmap to new clusters when it closes an image;
//! the engine changes bitmaps in place, crash-safely).

use std::io::Write;

use lexopt::Arg;

use crate::cli::{
    Fail, PROBED_RAW_WARNING, cvtnum, fail, no_value, open_error, opt_error, os_to_string,
    print_help, resolve_image, unknown_option, value,
};
use crate::disk::{BitmapChange, DirtyRunSink};
use crate::open;

/// One action, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

pub(super) fn cmd_bitmap(
    p: &mut lexopt::Parser,
    err: &mut dyn Write,
    out: &mut dyn Write,
) -> Result<i32, Fail> {
    let (mut fmt, mut image_opts, mut granularity) = (None, false, 0u64);
    let (mut source_file, mut source_fmt) = (None::<String>, None::<String>);
    let mut actions = Vec::new();
    let mut files = Vec::new();
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("bitmap", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("bitmap", p)?)?,
            Arg::Short('h') => return print_help("bitmap", out),
            Arg::Long("help") => {
                no_value("bitmap", "help", p)?;
                return print_help("bitmap", out);
            }
            // qemu-img bitmap has no `--format` (its help lists one it does not take).
            Arg::Short('f') => fmt = Some(value("bitmap", p)?),
            Arg::Long("image-opts") => image_opts = true,
            Arg::Short('b') | Arg::Long("source-file") => source_file = Some(value("bitmap", p)?),
            Arg::Short('F') | Arg::Long("source-format") => {
                source_fmt = Some(value("bitmap", p)?);
            }
            Arg::Short('g') | Arg::Long("granularity") => {
                granularity = cvtnum("granularity", &value("bitmap", p)?)?;
            }
            Arg::Long(a @ ("add" | "remove" | "clear" | "enable" | "disable")) => {
                let a = a.to_string();
                no_value("bitmap", &a, p)?;
                actions.push(match a.as_str() {
                    "add" => Action::Add,
                    "remove" => Action::Remove,
                    "clear" => Action::Clear,
                    "enable" => Action::Enable,
                    _ => Action::Disable,
                });
            }
            Arg::Long("merge") => actions.push(Action::Merge(value("bitmap", p)?)),
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("bitmap", other)),
        }
    }
    if actions.is_empty() {
        return Err(fail(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let merge = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if granularity != 0 && !actions.contains(&Action::Add) {
        return Err(fail("granularity only supported with --add"));
    }
    if source_fmt.is_some() && source_file.is_none() {
        return Err(fail("-F only supported with -b"));
    }
    if source_file.is_some() && !merge {
        return Err(fail("Merge bitmap source file only supported with --merge"));
    }
    let [file, bitmap] = files.as_slice() else {
        return Err(fail("Expecting filename and bitmap name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, fmt.as_deref())?;
    let probed = fmt.is_none();
    let mut target =
        open::open_disk_writable(&path, fmt.as_deref()).map_err(|e| open_error(file, e))?;
    let raw = target.chain.first().is_some_and(|i| i.format == "raw");
    if probed && raw {
        let _ = writeln!(err, "{}", PROBED_RAW_WARNING.replace("{}", file));
    }
    let mut source = match &source_file {
        Some(s) => match open::open_disk(s, source_fmt.as_deref()) {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = target.disk.close();
                return Err(open_error(s, e));
            }
        },
        None => None,
    };
    let mut result = Ok(());
    for action in &actions {
        let change = match action {
            Action::Add => BitmapChange::Add {
                granularity: (granularity != 0).then_some(granularity),
            },
            Action::Remove => BitmapChange::Remove,
            Action::Clear => BitmapChange::Clear,
            Action::Enable => BitmapChange::Enable,
            Action::Disable => BitmapChange::Disable,
            Action::Merge(_) => BitmapChange::Clear,
        };
        let done = match (action, source.as_mut()) {
            (Action::Merge(src), Some(source)) => {
                let mut feed =
                    |sink: &mut DirtyRunSink<'_>| source.disk.bitmap_dirty_runs(src, sink);
                target
                    .disk
                    .bitmap_change(bitmap, file, BitmapChange::MergeRuns(&mut feed))
            }
            (Action::Merge(src), None) => {
                target
                    .disk
                    .bitmap_change(bitmap, file, BitmapChange::Merge(src))
            }
            _ => target.disk.bitmap_change(bitmap, file, change),
        };
        if let Err(e) = done {
            result = Err(fail(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                action.name(),
                e.message()
            )));
            break;
        }
    }
    let closed = target.disk.close();
    result?;
    closed.map_err(|e| fail(e.to_string()))?;
    Ok(0)
}
