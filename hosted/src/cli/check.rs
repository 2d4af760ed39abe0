//! `qcow2 check`: qemu-img check's output (human and JSON) and exit codes over [`qcow2_core::check`].

use std::io::{self, Read, Write};

use qcow2_core::Error;
use qcow2_core::check::{CheckReport, CheckSink, Problem, RepairMode};

use crate::cli::json::Value;
use crate::file::FileDevice;
use crate::open::QCOW2_MAGIC;
use crate::qcow2_disk::engine_error;

/// Output format of `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutput {
    /// qemu-img's text.
    Human,
    /// qemu-img's `--output=json`.
    Json,
}

/// What `check` was asked to do.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The image file, as given.
    pub file: String,
    /// How the command line named the image, for messages, when not by `file` (an `--image-opts` string).
    pub shown: Option<String>,
    /// `-f`: the format, if given.
    pub format: Option<String>,
    /// `--output`.
    pub output: CheckOutput,
    /// `-q`.
    pub quiet: bool,
    /// `-r`.
    pub repair: Option<RepairMode>,
}

/// How `check` ended: the exit code, and the message for stderr (without the program name) if it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckEnd {
    /// Exit code (0 clean, 1 check failed, 2 corruptions, 3 leaks, 63 unsupported format).
    pub code: i32,
    /// The error message, if any.
    pub error: Option<String>,
}

/// Writes each problem to stderr as qemu-img does.
struct StderrSink<'a> {
    err: &'a mut dyn Write,
}

impl CheckSink for StderrSink<'_> {
    fn report(&mut self, problem: Problem) {
        if problem.has_message() {
            let _ = writeln!(self.err, "{problem}");
        }
    }
}

fn failed(code: i32, msg: impl Into<String>) -> CheckEnd {
    CheckEnd {
        code,
        error: Some(msg.into()),
    }
}

/// The human report, as `dump_human_image_check` prints it.
pub fn format_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    }
    if r.corruptions > 0 {
        s.push_str(&format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may \
             corrupt it.\n",
            r.corruptions
        ));
    }
    if r.leaks > 0 {
        s.push_str(&format!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to \
             data.\n",
            r.leaks
        ));
    }
    if r.check_errors > 0 {
        s.push_str(&format!(
            "\n{} internal errors have occurred during the check.\n",
            r.check_errors
        ));
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a,
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// The JSON report (QAPI `ImageCheck`; optional members only when non-zero), with its trailing newline.
pub fn format_json(file: &str, r: &CheckReport) -> String {
    let mut m: Vec<(String, Value)> = vec![
        ("filename".into(), Value::str(file)),
        ("format".into(), Value::str("qcow2")),
        ("check-errors".into(), Value::UInt(r.check_errors)),
    ];
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional {
        if v != 0 {
            m.push((k.into(), Value::UInt(v)));
        }
    }
    let mut s = Value::Object(m).to_pretty();
    s.push('\n');
    s
}

fn check_error(e: Error<io::Error>) -> String {
    match e {
        Error::Corrupt { .. } => "Check failed: Input/output error".to_string(),
        other => format!("Check failed: {}", engine_error(other)),
    }
}

/// Runs `check` on `opts.file`: the report goes to `out`, problems to `err`.
pub fn run_check(opts: &CheckOptions, out: &mut dyn Write, err: &mut dyn Write) -> CheckEnd {
    let path = opts.file.as_str();
    let shown = opts.shown.as_deref().unwrap_or(path);
    match opts.format.as_deref() {
        None | Some("qcow2") | Some("raw") => {}
        Some(other) => {
            return failed(
                1,
                format!("Could not open '{shown}': Unknown driver '{other}'"),
            );
        }
    }
    let file = match crate::file::open_image_file(path, opts.repair.is_some()) {
        Ok(f) => f,
        Err(e @ crate::file::OpenImageError::NotRegular) => {
            return failed(1, format!("Could not open '{shown}': {}", e.text(path)));
        }
        Err(e) => {
            return failed(
                1,
                format!(
                    "Could not open '{shown}': Could not open '{path}': {}",
                    e.text(path)
                ),
            );
        }
    };
    let mut magic = [0u8; 4];
    let got = (&file).take(4).read(&mut magic).unwrap_or(0);
    let is_qcow2 = got == 4 && magic == QCOW2_MAGIC;
    match opts.format.as_deref() {
        Some("qcow2") if !is_qcow2 => {
            return failed(
                1,
                format!("Could not open '{shown}': Image is not in qcow2 format"),
            );
        }
        Some("raw") => return failed(63, "This image format does not support checks"),
        None if !is_qcow2 => return failed(63, "This image format does not support checks"),
        _ => {}
    }
    // An encrypted image opens (for qemu-img's check too) only with its secret: unlocked first, so that
    // a missing or wrong one gives qemu-img's refusal.
    let mut crypt = [0u8; 4];
    let encrypted =
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut crypt, 32).is_ok() && crypt != [0; 4];
    if encrypted && let Err(e) = crate::open::open_disk(path, Some("qcow2")) {
        return failed(1, format!("Could not open '{shown}': {e}"));
    }
    let mut dev = FileDevice::new(file);
    let mut sink = StderrSink { err };
    let result = match opts.repair {
        None => qcow2_alloc::check::check(&mut dev, &mut sink),
        Some(mode) => qcow2_alloc::check::repair_once(&mut dev, mode, &mut sink).and_then(|first| {
            if first.corruptions_fixed == 0 && first.leaks_fixed == 0 {
                return Ok(first);
            }
            if opts.output == CheckOutput::Human && !opts.quiet {
                let _ = write!(
                    out,
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} \
                     corruptions\n\nDouble checking the fixed image now...\n",
                    first.leaks_fixed, first.corruptions_fixed
                );
                let _ = out.flush();
            }
            let mut again = qcow2_alloc::check::check(&mut dev, &mut sink)?;
            again.leaks_fixed = first.leaks_fixed;
            again.corruptions_fixed = first.corruptions_fixed;
            Ok(again)
        }),
    };
    let report = match result {
        Ok(r) => r,
        Err(Error::Unsupported { what, .. }) if what == qcow2_core::check::FILE_TOO_LARGE => {
            return failed(1, format!("Check failed: {what}"));
        }
        Err(
            e @ (Error::InvalidHeader { .. }
            | Error::NotQcow2 { .. }
            | Error::UnsupportedVersion(_)
            | Error::UnknownIncompatibleFeature { .. }
            | Error::Unsupported { .. }),
        ) => {
            return failed(1, format!("Could not open '{shown}': {}", engine_error(e)));
        }
        Err(e) => return failed(1, check_error(e)),
    };
    if !opts.quiet {
        let text = match opts.output {
            CheckOutput::Human => format_human(&report),
            CheckOutput::Json => format_json(path, &report),
        };
        let _ = out.write_all(text.as_bytes());
    }
    let _ = out.flush();
    if report.check_errors > 0 {
        return failed(1, "Check failed");
    }
    CheckEnd {
        code: report.exit_code(),
        error: None,
    }
}
