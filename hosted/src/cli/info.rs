//! `qemu-img info`: the command, and its output, human and JSON, from [`ImageInfo`].

use std::fmt::Write as _;
use std::io::Write;

use lexopt::Arg;

use crate::cli::{
    Fail, OutputFormat, fail, no_value, open_error, opt_error, os_to_string, parse_output,
    print_help, resolve_image, unknown_option, value,
};
use crate::{disk, open};

use crate::cli::json::{Value, human_dump_object};
use crate::cli::size::size_to_str;
use crate::disk::{EncryptInfo, FileChildInfo, ImageInfo, Qcow2Specific, SnapshotInfo};

fn kv(k: &str, v: Value) -> (String, Value) {
    (k.to_string(), v)
}

fn uint(v: u64) -> Value {
    // QAPI's ints are int64; every value here fits.
    Value::Int(v as i64)
}

/// The qcow2 `format-specific` dictionary (`{"type": "qcow2", "data": {...}}`), members in QAPI order.
fn qcow2_specific_json(q: &Qcow2Specific) -> Value {
    let mut data = vec![kv("compat", Value::str(&q.compat))];
    if let Some(f) = &q.data_file {
        data.push(kv("data-file", Value::str(f)));
    }
    if let Some(b) = q.data_file_raw {
        data.push(kv("data-file-raw", Value::Bool(b)));
    }
    if let Some(b) = q.extended_l2 {
        data.push(kv("extended-l2", Value::Bool(b)));
    }
    if let Some(b) = q.lazy_refcounts {
        data.push(kv("lazy-refcounts", Value::Bool(b)));
    }
    if let Some(b) = q.corrupt {
        data.push(kv("corrupt", Value::Bool(b)));
    }
    data.push(kv("refcount-bits", uint(q.refcount_bits)));
    if let Some(e) = &q.encrypt {
        data.push(kv("encrypt", encrypt_json(e)));
    }
    if let Some(bitmaps) = &q.bitmaps {
        let list = bitmaps
            .iter()
            .map(|b| {
                Value::Object(vec![
                    kv("name", Value::str(&b.name)),
                    kv("granularity", uint(b.granularity)),
                    kv(
                        "flags",
                        Value::Array(b.flags.iter().map(Value::str).collect()),
                    ),
                ])
            })
            .collect();
        data.push(kv("bitmaps", Value::Array(list)));
    }
    data.push(kv("compression-type", Value::str(&q.compression_type)));
    Value::Object(vec![
        kv("type", Value::str("qcow2")),
        kv("data", Value::Object(data)),
    ])
}

/// The `encrypt` member: QEMU's `ImageInfoSpecificQCow2Encryption` (the format, and for LUKS its
/// header: algorithms, UUID, key slots, payload offset, master key iterations).
fn encrypt_json(e: &EncryptInfo) -> Value {
    use qcow2_core::format::luks::{LUKS_SECTOR, STRIPES};
    let h = match e {
        EncryptInfo::Aes => return Value::Object(vec![kv("format", Value::str("aes"))]),
        EncryptInfo::Luks(h) => h,
    };
    let mut m = vec![
        kv("format", Value::str("luks")),
        kv("cipher-alg", Value::str(h.cipher.algorithm.name())),
        kv("cipher-mode", Value::str(h.cipher.mode.name())),
        kv("ivgen-alg", Value::str(h.cipher.ivgen.name())),
    ];
    if let Some(ih) = h.cipher.ivgen_hash {
        m.push(kv("ivgen-hash-alg", Value::str(ih.name())));
    }
    m.push(kv("hash-alg", Value::str(h.hash.name())));
    m.push(kv("detached-header", Value::Bool(false)));
    m.push(kv(
        "payload-offset",
        uint(u64::from(h.payload_offset_sector) * LUKS_SECTOR),
    ));
    m.push(kv(
        "master-key-iters",
        uint(u64::from(h.master_key_iterations)),
    ));
    let uuid_len = h.uuid.iter().position(|&b| b == 0).unwrap_or(h.uuid.len());
    m.push(kv(
        "uuid",
        Value::str(String::from_utf8_lossy(&h.uuid[..uuid_len]).into_owned()),
    ));
    let slots = h
        .slots
        .iter()
        .map(|s| {
            let mut o = vec![kv("active", Value::Bool(s.active))];
            if s.active {
                o.push(kv("iters", uint(u64::from(s.iterations))));
                o.push(kv("stripes", uint(u64::from(STRIPES))));
            }
            o.push(kv(
                "key-offset",
                uint(u64::from(s.key_offset_sector) * LUKS_SECTOR),
            ));
            Value::Object(o)
        })
        .collect();
    m.push(kv("slots", Value::Array(slots)));
    Value::Object(m)
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = vec![
        kv("id", Value::str(&s.id)),
        kv("name", Value::str(&s.name)),
        kv("vm-state-size", uint(s.vm_state_size)),
        kv("date-sec", uint(s.date_sec)),
        kv("date-nsec", uint(u64::from(s.date_nsec))),
        kv("vm-clock-sec", uint(s.vm_clock_nsec / 1_000_000_000)),
        kv("vm-clock-nsec", uint(s.vm_clock_nsec % 1_000_000_000)),
    ];
    if let Some(i) = s.icount {
        m.push(kv("icount", uint(i)));
    }
    Value::Object(m)
}

fn file_child_json(f: &FileChildInfo) -> Value {
    let mut m = vec![
        kv("filename", Value::str(&f.filename)),
        kv("format", Value::str("file")),
        kv("dirty-flag", Value::Bool(false)),
    ];
    if let Some(a) = f.actual_size {
        m.push(kv("actual-size", uint(a)));
    }
    m.push(kv("virtual-size", uint(f.length)));
    m.push(kv(
        "format-specific",
        Value::Object(vec![
            kv("type", Value::str("file")),
            kv("data", Value::Object(vec![])),
        ]),
    ));
    m.push(kv("children", Value::Array(vec![])));
    Value::Object(m)
}

/// The JSON object `qemu-img info --output=json` prints for one image.
pub fn image_info_json(info: &ImageInfo) -> Value {
    let mut m = vec![
        kv("filename", Value::str(&info.filename)),
        kv("format", Value::str(&info.format)),
        kv("dirty-flag", Value::Bool(info.dirty_flag)),
    ];
    if let Some(a) = info.actual_size {
        m.push(kv("actual-size", uint(a)));
    }
    m.push(kv("virtual-size", uint(info.virtual_size)));
    if let Some(c) = info.cluster_size {
        m.push(kv("cluster-size", uint(c)));
    }
    if info.encrypted {
        m.push(kv("encrypted", Value::Bool(true)));
    }
    if let Some(b) = &info.backing_filename {
        m.push(kv("backing-filename", Value::str(b)));
    }
    if let Some(b) = &info.full_backing_filename {
        m.push(kv("full-backing-filename", Value::str(b)));
    }
    if let Some(b) = &info.backing_filename_format {
        m.push(kv("backing-filename-format", Value::str(b)));
    }
    if !info.snapshots.is_empty() {
        m.push(kv(
            "snapshots",
            Value::Array(info.snapshots.iter().map(snapshot_json).collect()),
        ));
    }
    if let Some(q) = &info.qcow2 {
        m.push(kv("format-specific", qcow2_specific_json(q)));
    }
    let children = match &info.file {
        Some(f) => vec![Value::Object(vec![
            kv("name", Value::str("file")),
            kv("info", file_child_json(f)),
        ])],
        None => vec![],
    };
    m.push(kv("children", Value::Array(children)));
    Value::Object(m)
}

/// `qemu-img info --output=json` text (with the trailing newline). With `chain`, the images of a backing chain
/// as a JSON array.
pub fn format_info_json(images: &[ImageInfo], chain: bool) -> String {
    let value = if chain {
        Value::Array(images.iter().map(image_info_json).collect())
    } else {
        image_info_json(&images[0])
    };
    let mut s = value.to_pretty();
    s.push('\n');
    s
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Snapshot date as `%Y-%m-%d %H:%M:%S`. QEMU uses local time; this tool prints UTC (the two agree where the
/// time zone is UTC, as on the test machines).
fn format_date(secs: u64) -> String {
    let secs = secs as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// The header line of qemu-img's snapshot table.
pub fn snapshot_table_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One row of qemu-img's snapshot table.
pub fn snapshot_table_row(s: &SnapshotInfo) -> String {
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        format_date(s.date_sec),
        clock,
        icount
    )
}

/// Human `qemu-img info` text for one image (ends with a newline).
pub fn format_info_human(info: &ImageInfo) -> String {
    let mut out = String::new();
    let dsize = info
        .actual_size
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".to_string());
    let _ = writeln!(out, "image: {}", info.filename);
    let _ = writeln!(out, "file format: {}", info.format);
    let _ = writeln!(
        out,
        "virtual size: {} ({} bytes)",
        size_to_str(info.virtual_size),
        info.virtual_size
    );
    let _ = writeln!(out, "disk size: {dsize}");
    if info.encrypted {
        out.push_str("encrypted: yes\n");
    }
    if let Some(c) = info.cluster_size {
        let _ = writeln!(out, "cluster_size: {c}");
    }
    if info.dirty_flag {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &info.backing_filename {
        let _ = write!(out, "backing file: {b}");
        match &info.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => {
                let _ = write!(out, " (actual path: {full})");
            }
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = &info.backing_filename_format {
            let _ = writeln!(out, "backing file format: {f}");
        }
    }
    if !info.snapshots.is_empty() {
        out.push_str("Snapshot list:\n");
        out.push_str(&snapshot_table_header());
        out.push('\n');
        for s in &info.snapshots {
            out.push_str(&snapshot_table_row(s));
            out.push('\n');
        }
    }
    if let Some(q) = &info.qcow2
        && let Some(Value::Object(data)) = qcow2_specific_json(q).get("data")
        && !data.is_empty()
    {
        out.push_str("Format specific information:\n");
        human_dump_object(&mut out, data, 4);
    }
    if let Some(f) = &info.file {
        out.push_str("Child node '/file':\n");
        let fsize = f
            .actual_size
            .map(size_to_str)
            .unwrap_or_else(|| "unavailable".to_string());
        let _ = writeln!(out, "    filename: {}", f.filename);
        out.push_str("    protocol type: file\n");
        let _ = writeln!(
            out,
            "    file length: {} ({} bytes)",
            size_to_str(f.length),
            f.length
        );
        let _ = writeln!(out, "    disk size: {fsize}");
    }
    out
}

/// Human `qemu-img info [--backing-chain]` text: the images separated by blank lines.
pub fn format_info_human_chain(images: &[ImageInfo], chain: bool) -> String {
    let images = if chain { images } else { &images[..1] };
    let mut out = String::new();
    for (i, info) in images.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format_info_human(info));
    }
    out
}

pub(super) fn cmd_info(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let mut image_opts = false;
    let (mut fmt, mut output, mut chain, mut files) =
        (None, OutputFormat::Human, false, Vec::new());
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("info", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("info", p)?)?,
            Arg::Short('h') => return print_help("info", out),
            Arg::Long("help") => {
                return no_value("info", "help", p).and_then(|()| print_help("info", out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("info", p)?),
            Arg::Long("output") => output = parse_output(&value("info", p)?)?,
            Arg::Short('b') | Arg::Long("backing-chain") => chain = true,
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("info", other)),
        }
    }
    let [file] = files.as_slice() else {
        return Err(fail("Expecting one image file name"));
    };
    let (path, fmt) = resolve_image(file, image_opts, fmt.as_deref())?;
    let images = info_images(file, path, fmt, chain)?;
    let text = match output {
        OutputFormat::Json => format_info_json(&images, chain),
        OutputFormat::Human => format_info_human_chain(&images, chain),
    };
    out.write_all(text.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

/// What `info` describes: the image alone, and with `chain` each image of its backing chain, each opened
/// alone in turn by its full backing file name and format as qemu-img does (so a missing or unreadable
/// backing file is named in the message, and a chain that comes back to a name already seen is refused).
/// Nothing is printed unless every image opens.
fn info_images(
    shown: &str,
    path: String,
    fmt: Option<String>,
    chain: bool,
) -> Result<Vec<disk::ImageInfo>, Fail> {
    let (mut shown, mut path, mut fmt) = (shown.to_string(), path, fmt);
    let mut seen = std::collections::HashSet::new();
    let mut images = Vec::new();
    loop {
        if !seen.insert(shown.clone()) {
            return Err(fail(format!(
                "Backing file '{shown}' creates an infinite loop."
            )));
        }
        // Like qemu-img, the backing files are not opened here (and need not exist).
        let img =
            open::open_disk_alone(&path, fmt.as_deref()).map_err(|e| open_error(&shown, e))?;
        let Some(info) = img.chain.into_iter().next() else {
            return Err(fail(format!(
                "Could not open '{shown}': no image information"
            )));
        };
        // The engine's rule for a backing file whose format was probed: it may name no other file.
        if !images.is_empty() && fmt.is_none() && info.format == "qcow2" {
            let data_file = info.qcow2.as_ref().is_some_and(|q| q.data_file.is_some());
            let refused = if info.backing_filename.is_some() {
                Some(qcow2_core::engine::PROBED_NAMES_BACKING)
            } else {
                data_file.then_some(qcow2_core::engine::PROBED_NAMES_DATA_FILE)
            };
            if let Some(why) = refused {
                return Err(fail(format!("Could not open '{shown}': {why}")));
            }
        }
        let next = (info.backing_filename.is_some() && chain).then(|| {
            (
                info.full_backing_filename.clone(),
                info.backing_filename_format.clone(),
            )
        });
        images.push(info);
        match next {
            None => return Ok(images),
            Some((Some(full), format)) => {
                (shown, path, fmt) = (full.clone(), full, format);
            }
            Some((None, _)) => {
                return Err(fail(format!(
                    "Could not determine absolute backing filename, but backing filename '{}' present",
                    images
                        .last()
                        .and_then(|i| i.backing_filename.as_deref())
                        .unwrap_or_default()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::BitmapInfo;

    fn qcow2_info() -> ImageInfo {
        let mut q = Qcow2Specific::new(3, 16, "zlib");
        q.bitmaps = Some(vec![BitmapInfo {
            name: "bm0".into(),
            granularity: 65536,
            flags: vec!["auto".into()],
        }]);
        ImageInfo {
            filename: "s.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: 67108864,
            actual_size: Some(307200),
            dirty_flag: false,
            cluster_size: Some(65536),
            encrypted: false,
            backing_filename: Some("base.qcow2".into()),
            full_backing_filename: Some("/tmp/base.qcow2".into()),
            backing_filename_format: Some("qcow2".into()),
            snapshots: vec![SnapshotInfo {
                id: "1".into(),
                name: "snap1".into(),
                vm_state_size: 0,
                date_sec: 1795431579,
                date_nsec: 739425000,
                vm_clock_nsec: 0,
                icount: Some(0),
            }],
            qcow2: Some(q),
            file: Some(FileChildInfo {
                filename: "s.qcow2".into(),
                length: 852480,
                actual_size: Some(307200),
            }),
        }
    }

    #[test]
    fn human_layout() {
        let text = format_info_human(&qcow2_info());
        let expected = "image: s.qcow2
file format: qcow2
virtual size: 64 MiB (67108864 bytes)
disk size: 300 KiB
cluster_size: 65536
backing file: base.qcow2 (actual path: /tmp/base.qcow2)
backing file format: qcow2
Snapshot list:
ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT
1       snap1                 0 B 2026-11-23 10:59:39  0000:00:00.000          0
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    bitmaps:
        [0]:
            flags:
                [0]: auto
            name: bm0
            granularity: 65536
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: s.qcow2
    protocol type: file
    file length: 832 KiB (852480 bytes)
    disk size: 300 KiB
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_layout_of_raw() {
        let info = ImageInfo::raw(
            "r.raw",
            FileChildInfo {
                filename: "r.raw".into(),
                length: 67108864,
                actual_size: Some(135168),
            },
        );
        let expected = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 67108864,
                "filename": "r.raw",
                "format": "file",
                "actual-size": 135168,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "virtual-size": 67108864,
    "filename": "r.raw",
    "format": "raw",
    "actual-size": 135168,
    "dirty-flag": false
}
"#;
        assert_eq!(format_info_json(&[info], false), expected);
    }

    #[test]
    fn json_snapshot_and_qcow2_key_order() {
        let text = format_info_json(&[qcow2_info()], false);
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix('"'))
            .filter_map(|l| l.split_once("\":").map(|(k, _)| k))
            .collect();
        let snap = [
            "icount",
            "vm-clock-nsec",
            "name",
            "date-sec",
            "date-nsec",
            "vm-clock-sec",
            "id",
            "vm-state-size",
        ];
        let pos = keys.iter().position(|k| *k == "icount").unwrap();
        assert_eq!(&keys[pos..pos + 8], &snap);
        let top: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("    \""))
            .map(|l| {
                l.trim_start()
                    .trim_start_matches('"')
                    .split('"')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            top,
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
                "dirty-flag"
            ]
        );
    }
}
