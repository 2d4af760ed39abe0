//! `qemu-img measure`: how large a new raw or qcow2 image would be, for a virtual size (`--size`) or to hold
//! an existing image's content: the required size (what a conversion writes, metadata for a fully
//! allocated image included), the fully allocated size and, for a qcow2 v3 target of a qcow2 v3 source, the
//! room its persistent bitmaps take. The numbers are QEMU's (`qcow2_measure`, `raw_measure`).

use std::io::Write;

use lexopt::Arg;
use qcow2_core::create::measure::fully_allocated_size;
use qcow2_core::format::luks::LuksHeader;

use crate::cli::convert::args::load_snapshot;
use crate::cli::{
    Fail, fail, no_value, open_error, opt_error, os_to_string, print_help, resolve_image, size,
    unknown_option, value,
};
use crate::disk::VirtualDisk;
use crate::open;

/// The qcow2 options `measure` reads, validated in QEMU's order.
struct Qcow2Target {
    cluster_size: u64,
    extended_l2: bool,
    version: u32,
    refcount_order: u32,
    /// `preallocation=full` or `falloc`: every cluster counts as required.
    full: bool,
    backing: bool,
    /// Bytes of whole clusters the LUKS area of an encrypted target takes (`encrypt.format=luks`).
    luks_area: u64,
}

/// The options each output format and the file protocol take, and their kinds (for the parse errors).
const QCOW2_KEYS: &[(&str, char)] = &[
    ("size", 's'),
    ("compat", 't'),
    ("backing_file", 't'),
    ("backing_fmt", 't'),
    ("data_file", 't'),
    ("data_file_raw", 'b'),
    ("encryption", 'b'),
    ("encrypt.format", 't'),
    ("encrypt.key-secret", 't'),
    ("encrypt.cipher-alg", 't'),
    ("encrypt.cipher-mode", 't'),
    ("encrypt.ivgen-alg", 't'),
    ("encrypt.ivgen-hash-alg", 't'),
    ("encrypt.hash-alg", 't'),
    ("encrypt.iter-time", 'n'),
    ("cluster_size", 's'),
    ("preallocation", 't'),
    ("lazy_refcounts", 'b'),
    ("refcount_bits", 'n'),
    ("compression_type", 't'),
    ("extended_l2", 'b'),
    ("nocow", 'b'),
    ("extent_size_hint", 's'),
];
const RAW_KEYS: &[(&str, char)] = &[
    ("size", 's'),
    ("preallocation", 't'),
    ("nocow", 'b'),
    ("extent_size_hint", 's'),
];

/// Parses `-o` options as QEMU's option parser does (later values win); a mistake is QEMU's message
/// followed by "Invalid options for file format".
fn parse_options(
    options: &[String],
    keys: &[(&str, char)],
    fmt: &str,
) -> Result<Vec<(String, String)>, Fail> {
    let bad = |m: String| {
        fail(format!(
            "{m}\n{}: Invalid options for file format '{fmt}'",
            crate::cli::PROG
        ))
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for kv in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        let Some((_, kind)) = keys.iter().find(|(n, _)| *n == k) else {
            return Err(bad(format!("Invalid parameter '{k}'")));
        };
        match kind {
            's' if size::parse_size(v).is_err() => {
                return Err(bad(format!(
                    "Parameter '{k}' expects a non-negative number below 2^64\nOptional suffix k, M, \
                     G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                )));
            }
            'b' if v != "on" && v != "off" => {
                return Err(bad(format!("Parameter '{k}' expects 'on' or 'off'")));
            }
            'n' if v.parse::<u64>().is_err() => {
                return Err(bad(format!("Parameter '{k}' expects a number")));
            }
            _ => {}
        }
        out.retain(|(key, _)| key != k);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn qcow2_target(opts: &[(String, String)]) -> Result<Qcow2Target, Fail> {
    let extended_l2 = get(opts, "extended_l2") == Some("on");
    let cluster_size = get(opts, "cluster_size")
        .and_then(|v| size::parse_size(v).ok())
        .unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(fail(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(fail(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let version = match get(opts, "compat") {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => return Err(fail(format!("Invalid compatibility level: '{other}'"))),
    };
    let refcount_bits = get(opts, "refcount_bits")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(fail(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(fail(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use \
             compat=1.1 or greater)",
        ));
    }
    let full = match get(opts, "preallocation") {
        None | Some("off") | Some("metadata") => false,
        Some("falloc") | Some("full") => true,
        Some(other) => return Err(fail(format!("invalid parameter value: {other}"))),
    };
    // An encrypted target: the LUKS area in whole clusters (QEMU's payload offset rounded up), none for
    // legacy AES (whose secret qemu-img does not ask for here). LUKS options are checked as `create`
    // checks them (the secret must exist).
    let encryption = if get(opts, "encrypt.format") == Some("luks") {
        crate::cli::encrypt::parse_create(&|n| get(opts, n).map(str::to_string), "")
            .map_err(|e| fail(e.0.strip_prefix(": ").unwrap_or(&e.0).to_string()))?
    } else {
        None
    };
    let luks_area = match encryption {
        Some(crate::cli::encrypt::NewEncryption::Luks { cipher, .. }) => {
            let area = LuksHeader::area_len(cipher.key_bytes() as u32);
            area.div_ceil(cluster_size) * cluster_size
        }
        _ => 0,
    };
    Ok(Qcow2Target {
        cluster_size,
        extended_l2,
        version,
        refcount_order: refcount_bits.trailing_zeros(),
        full,
        backing: get(opts, "backing_file").is_some(),
        luks_area,
    })
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size` for bitmaps `(name length, granularity)` over a disk of
/// `size` bytes: each bitmap whole, its table, and the directory.
fn bitmaps_size(bitmaps: &[(usize, u64)], size: u64, cluster: u64) -> u64 {
    let round = |n: u64, to: u64| n.div_ceil(to) * to;
    let mut total = 0;
    let mut directory = 0;
    for &(name_len, granularity) in bitmaps {
        let bytes = size.div_ceil(granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cluster);
        total += clusters * cluster + round(clusters * 8, cluster);
        directory += round(24 + name_len as u64, 8);
    }
    total + round(directory, cluster)
}

pub(super) fn cmd_measure(p: &mut lexopt::Parser, out: &mut dyn Write) -> Result<i32, Fail> {
    let (mut fmt, mut out_fmt, mut options, mut snapshot) =
        (None, "raw".to_string(), Vec::new(), None::<String>);
    let (mut json, mut img_size, mut files) = (false, None, Vec::new());
    let mut image_opts = false;
    let mut objects = crate::cli::object::Objects::default();
    while let Some(arg) = p.next().map_err(|e| opt_error("measure", e))? {
        match arg {
            Arg::Long("object") => objects.add(&value("measure", p)?)?,
            Arg::Short('h') => return print_help("measure", out),
            Arg::Long("help") => {
                return no_value("measure", "help", p).and_then(|()| print_help("measure", out));
            }
            Arg::Short('f') | Arg::Long("format") => fmt = Some(value("measure", p)?),
            Arg::Short('O') | Arg::Long("target-format") => out_fmt = value("measure", p)?,
            Arg::Short('o') => options.push(value("measure", p)?),
            Arg::Short('l') | Arg::Long("snapshot") => snapshot = Some(value("measure", p)?),
            Arg::Short('U') | Arg::Long("force-share") => {}
            Arg::Long("output") => {
                json = match value("measure", p)?.as_str() {
                    "json" => true,
                    "human" => false,
                    other => {
                        return Err(fail(format!(
                            "--output expects 'human' or 'json' not '{other}'"
                        )));
                    }
                }
            }
            Arg::Long("size") => {
                let v = value("measure", p)?;
                img_size = Some(size::parse_size(&v).map_err(|e| match e {
                    size::SizeError::Invalid if !v.trim_start().starts_with('-') => {
                        fail(format!("Invalid image size specified: '{v}'."))
                    }
                    _ => fail(format!(
                        "Invalid image size specified. Must be between 0 and {}.",
                        i64::MAX
                    )),
                })?);
            }
            Arg::Long("image-opts") => image_opts = true,
            Arg::Value(v) => files.push(os_to_string(v)?),
            other => return Err(unknown_option("measure", other)),
        }
    }
    if files.len() > 1 {
        return Err(fail("At most one filename argument is allowed."));
    }
    let file = files.pop();
    if file.is_none() && (image_opts || fmt.is_some() || snapshot.is_some()) {
        return Err(fail(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    if file.is_some() && img_size.is_some() {
        return Err(fail("--size N cannot be used together with a filename."));
    }
    if file.is_none() && img_size.is_none() {
        return Err(fail("Either --size N or one filename must be specified."));
    }
    let mut source = match &file {
        Some(f) => {
            let (path, fmt) = resolve_image(f, image_opts, fmt.as_deref())?;
            let mut img = open::open_disk(&path, fmt.as_deref()).map_err(|e| open_error(f, e))?;
            if let Some(spec) = &snapshot {
                load_snapshot(img.disk.as_mut(), spec, false)?;
            }
            Some(img)
        }
        None => None,
    };
    let keys = match out_fmt.as_str() {
        "qcow2" => QCOW2_KEYS,
        "raw" => RAW_KEYS,
        other => return Err(fail(format!("Unknown file format '{other}'"))),
    };
    let opts = parse_options(&options, keys, &out_fmt)?;
    // `-o size=...` stands for --size when no file is given.
    let size_option = get(&opts, "size").and_then(|v| size::parse_size(v).ok());
    let (required, fully, bitmaps) = if out_fmt == "raw" {
        let n = match &source {
            Some(img) => img.disk.virtual_size(),
            None => img_size.or(size_option).unwrap_or(0).div_ceil(512) * 512,
        };
        (n, n, None)
    } else {
        let t = qcow2_target(&opts)?;
        let cs = t.cluster_size;
        let mut virtual_size = img_size.or(size_option).unwrap_or(0).div_ceil(cs) * cs;
        let entry = if t.extended_l2 { 16 } else { 8 };
        let l2_tables = (virtual_size / cs).div_ceil(cs / entry);
        if l2_tables * 8 > 32 << 20 {
            return Err(fail(
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        // Without a source, no data is required: only the metadata of a fully allocated image.
        let mut required = 0;
        let mut bitmaps = None;
        if let Some(img) = source.as_mut() {
            let ssize = img.disk.virtual_size();
            virtual_size = ssize.div_ceil(cs) * cs;
            required = if t.backing {
                // The new image's backing file may share nothing with the source: every cluster counts.
                virtual_size
            } else {
                allocated_clusters_bytes(img.disk.as_mut(), ssize, cs)
                    .map_err(|e| fail(format!("Unable to get block status: {e}")))?
            };
            let top = img.chain.first();
            let source_v3 = top
                .and_then(|i| i.qcow2.as_ref())
                .is_some_and(|q| q.compat == "1.1");
            if t.version >= 3 && source_v3 {
                let list: Vec<(usize, u64)> = top
                    .and_then(|i| i.qcow2.as_ref())
                    .and_then(|q| q.bitmaps.as_ref())
                    .map(|b| b.iter().map(|b| (b.name.len(), b.granularity)).collect())
                    .unwrap_or_default();
                bitmaps = Some(bitmaps_size(&list, ssize, cs));
            }
        }
        if t.full {
            required = virtual_size;
        }
        let fully =
            fully_allocated_size(virtual_size, cs, t.refcount_order, t.extended_l2) + t.luks_area;
        (fully - virtual_size + required, fully, bitmaps)
    };
    let text = if json {
        let mut s = String::from("{\n");
        if let Some(b) = bitmaps {
            s.push_str(&format!("    \"bitmaps\": {b},\n"));
        }
        s.push_str(&format!(
            "    \"required\": {required},\n    \"fully-allocated\": {fully}\n}}\n"
        ));
        s
    } else {
        let mut s = format!("required size: {required}\nfully allocated size: {fully}\n");
        if let Some(b) = bitmaps {
            s.push_str(&format!("bitmaps size: {b}\n"));
        }
        s
    };
    out.write_all(text.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(0)
}

/// The bytes of whole clusters that hold data in `disk` (through its backing chain), counted as QEMU's
/// measure counts them: each data extent runs on to the end of its cluster, and the walk goes on from there.
fn allocated_clusters_bytes(
    disk: &mut (dyn VirtualDisk + Send),
    size: u64,
    cluster: u64,
) -> Result<u64, crate::disk::DiskError> {
    let mut required = 0;
    let mut offset = 0;
    while offset < size {
        let e = disk.map_extent(offset, size - offset)?;
        let mut n = e.length.max(1);
        if !e.zero && e.data && e.present {
            n = (offset + n).div_ceil(cluster) * cluster - offset;
            required += offset % cluster + n;
        }
        offset += n;
    }
    Ok(required)
}
