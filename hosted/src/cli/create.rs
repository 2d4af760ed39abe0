//! `qcow2 create`: new qcow2 and raw images, as `qemu-img create` makes them.
//!
//! The qcow2 layout comes from [`qcow2_core::create`]; this module parses qemu-img's command line and
//! `-o` options, prints its "Formatting ..." line, takes the size from the backing file when none is given,
//! and creates, sizes and preallocates the files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use qcow2_core::create::{Compat, CreateOptions, Preallocation, create};
use qcow2_core::format::CompressionType;

use crate::cli::size::{SizeError, parse_size};
use crate::file::FileDevice;

/// What the command line asked for.
#[derive(Debug, Default, Clone)]
pub struct CreateArgs {
    /// `-q`: no "Formatting" line.
    pub quiet: bool,
    /// `-f`: `qcow2` or `raw` (default `raw`, as qemu-img).
    pub format: Option<String>,
    /// `-o` option strings, in order.
    pub options: Vec<String>,
    /// `-b`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_fmt: Option<String>,
    /// `-u`: do not open the backing file.
    pub unsafe_backing: bool,
    /// The image file name.
    pub file: String,
    /// The size argument, if any.
    pub size: Option<String>,
}

/// One option as given: its value text and the parsed number where the option is a number.
#[derive(Debug, Default, Clone)]
struct Opt {
    text: Option<String>,
    num: Option<u64>,
}

/// The options qemu-img knows for each format, in the order it prints them, with their defaults
/// (printed even when not given).
const QCOW2_OPTS: &[(&str, Kind, Option<&str>)] = &[
    ("encryption", Kind::Bool, None),
    ("encrypt.format", Kind::Str, None),
    ("encrypt.key-secret", Kind::Str, None),
    ("encrypt.cipher-alg", Kind::Str, None),
    ("encrypt.cipher-mode", Kind::Str, None),
    ("encrypt.ivgen-alg", Kind::Str, None),
    ("encrypt.ivgen-hash-alg", Kind::Str, None),
    ("encrypt.hash-alg", Kind::Str, None),
    ("encrypt.iter-time", Kind::Number, None),
    ("cluster_size", Kind::Size, Some("65536")),
    ("extended_l2", Kind::Bool, Some("off")),
    ("preallocation", Kind::Str, None),
    ("compression_type", Kind::Str, Some("zlib")),
    ("size", Kind::Size, None),
    ("compat", Kind::Str, None),
    ("backing_file", Kind::Str, None),
    ("backing_fmt", Kind::Str, None),
    ("data_file", Kind::Str, None),
    ("data_file_raw", Kind::Bool, None),
    ("lazy_refcounts", Kind::Bool, Some("off")),
    ("refcount_bits", Kind::Number, Some("16")),
];

const RAW_OPTS: &[(&str, Kind, Option<&str>)] = &[
    ("size", Kind::Size, None),
    ("preallocation", Kind::Str, None),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Size,
    Bool,
    Number,
    Str,
}

/// A failure: the message (qemu-img's wording, without the program name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateError(pub String);

fn err(msg: impl Into<String>) -> CreateError {
    CreateError(msg.into())
}

/// Splits `a=b,c=d` (`,,` stands for a comma inside a value).
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn parse_bool(name: &str, v: &str) -> Result<bool, CreateError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(err(format!("Parameter '{name}' expects 'on' or 'off'"))),
    }
}

fn parse_number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// Parses the `-o` strings against the format's option list. Errors here come before the "Formatting" line.
fn parse_options(
    file: &str,
    list: &[(&'static str, Kind, Option<&'static str>)],
    given: &[String],
) -> Result<Vec<Opt>, CreateError> {
    let mut opts = vec![Opt::default(); list.len()];
    for group in given {
        for item in split_options(group) {
            if item.is_empty() {
                continue;
            }
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, v),
                None => (item.as_str(), "on"),
            };
            let Some(i) = list.iter().position(|(n, _, _)| *n == name) else {
                return Err(err(format!("{file}: Invalid parameter '{name}'")));
            };
            let kind = list[i].1;
            let num =
                match kind {
                    Kind::Size => Some(parse_size(value).map_err(|_| {
                        err(format!(
                            "{file}: Parameter '{name}' expects a non-negative number below 2^64"
                        ))
                    })?),
                    Kind::Number => Some(parse_number(value).ok_or_else(|| {
                        err(format!("{file}: Parameter '{name}' expects a number"))
                    })?),
                    Kind::Bool => {
                        parse_bool(name, value).map_err(|e| err(format!("{file}: {}", e.0)))?;
                        None
                    }
                    Kind::Str => None,
                };
            opts[i] = Opt {
                text: Some(value.to_string()),
                num,
            };
        }
    }
    Ok(opts)
}

/// The "Formatting 'FILE', fmt=FMT k=v ..." line: given options and options with defaults, in qemu's order.
fn formatting_line(
    file: &str,
    fmt: &str,
    list: &[(&'static str, Kind, Option<&'static str>)],
    opts: &[Opt],
) -> String {
    let mut line = format!("Formatting '{file}', fmt={fmt}");
    for ((name, _, default), o) in list.iter().zip(opts) {
        let value = match (&o.num, &o.text, default) {
            (Some(n), _, _) => n.to_string(),
            (None, Some(t), _) => t.clone(),
            (None, None, Some(d)) => d.to_string(),
            (None, None, None) => continue,
        };
        line.push_str(&format!(" {name}={value}"));
    }
    line
}

fn opt<'a>(
    list: &[(&'static str, Kind, Option<&'static str>)],
    opts: &'a [Opt],
    name: &str,
) -> &'a Opt {
    static NONE: Opt = Opt {
        text: None,
        num: None,
    };
    list.iter()
        .position(|(n, _, _)| *n == name)
        .and_then(|i| opts.get(i))
        .unwrap_or(&NONE)
}

/// Where a name stored in an image (backing file, data file) is found: relative to the image's directory.
fn relative_to_image(image: &str, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

fn open_for_create(path: &Path, file: &str) -> Result<File, CreateError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| {
            err(format!(
                "{file}: Could not create '{}': {}",
                path.display(),
                crate::disk::DiskError::os_text(&e)
            ))
        })
}

/// Sizes `file` to `len` and preallocates it: `falloc` reserves the space, `full` writes zeros from
/// `from` to the end.
fn preallocate_file(
    f: &File,
    from: u64,
    len: u64,
    mode: Preallocation,
    name: &str,
) -> Result<(), CreateError> {
    let io = |e: std::io::Error| err(format!("{name}: {}", crate::disk::DiskError::os_text(&e)));
    f.set_len(len).map_err(io)?;
    match mode {
        Preallocation::Falloc => {
            let _ = rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, len);
        }
        Preallocation::Full => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = from;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                f.write_all_at(&zeros[..n], at).map_err(io)?;
                at += n as u64;
            }
        }
        Preallocation::Off | Preallocation::Metadata => {}
    }
    Ok(())
}

fn parse_prealloc(v: Option<&str>) -> Result<Preallocation, String> {
    Ok(match v {
        None | Some("off") => Preallocation::Off,
        Some("metadata") => Preallocation::Metadata,
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => {
            return Err(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            ));
        }
    })
}

/// Runs `create`, printing the "Formatting" line to `out` unless quiet.
pub fn run_create(args: &CreateArgs, out: &mut dyn Write) -> Result<(), CreateError> {
    let file = args.file.as_str();
    let fmt = args.format.as_deref().unwrap_or("raw");
    let list = match fmt {
        "qcow2" => QCOW2_OPTS,
        "raw" => RAW_OPTS,
        other => return Err(err(format!("{file}: Unknown file format '{other}'"))),
    };
    let mut opts = parse_options(file, list, &args.options)?;
    // -b and -F are the backing_file and backing_fmt options.
    if fmt == "qcow2" {
        for (name, v) in [
            ("backing_file", &args.backing),
            ("backing_fmt", &args.backing_fmt),
        ] {
            if let Some(v) = v
                && let Some(i) = list.iter().position(|(n, _, _)| *n == name)
            {
                opts[i] = Opt {
                    text: Some(v.clone()),
                    num: None,
                };
            }
        }
    } else if args.backing.is_some() {
        return Err(err(format!(
            "{file}: Backing file not supported for file format '{fmt}'"
        )));
    }
    let size_index = list.iter().position(|(n, _, _)| *n == "size").unwrap_or(0);
    if let Some(s) = &args.size {
        if opts[size_index].num.is_some() {
            return Err(err(format!(
                "{file}: The image size must be specified only once"
            )));
        }
        let n = parse_size(s).map_err(|e| match e {
            SizeError::TooLarge => {
                err("Invalid image size specified. Must be between 0 and 9223372036854775807.")
            }
            SizeError::Invalid => err(format!("Invalid image size specified: '{s}'.")),
        })?;
        opts[size_index] = Opt {
            text: Some(s.clone()),
            num: Some(n),
        };
    }
    let backing = opt(list, &opts, "backing_file").text.clone();
    let backing_fmt = opt(list, &opts, "backing_fmt").text.clone();
    if backing.is_some() && backing_fmt.is_none() {
        return Err(err(format!(
            "{file}: Backing file specified without backing format"
        )));
    }
    // Unless -u, the backing file must open (before anything is printed); without a size, it gives it.
    let mut backing_size = None;
    if let (Some(b), false) = (&backing, args.unsafe_backing) {
        let path = relative_to_image(file, b);
        let img = crate::open::open_disk(&path.to_string_lossy(), backing_fmt.as_deref())
            .map_err(|e| err(format!("{file}: {e}")))?;
        backing_size = Some(img.disk.virtual_size());
    }
    if opts[size_index].num.is_none() {
        let Some(n) = backing_size else {
            return Err(err(format!(
                "{file}: Image creation needs a size parameter"
            )));
        };
        opts[size_index] = Opt {
            text: None,
            num: Some(n),
        };
    }
    let size = opts[size_index].num.unwrap_or(0);
    if !args.quiet {
        writeln!(out, "{}", formatting_line(file, fmt, list, &opts))
            .map_err(|e| err(e.to_string()))?;
        let _ = out.flush();
    }
    if fmt == "raw" {
        let prealloc = parse_prealloc(opt(list, &opts, "preallocation").text.as_deref())
            .map_err(|m| err(format!("{file}: {m}")))?;
        if prealloc == Preallocation::Metadata {
            return Err(err(format!(
                "{file}: Unsupported preallocation mode: metadata"
            )));
        }
        // Like QEMU, whole sectors.
        let f = open_for_create(Path::new(file), file)?;
        return preallocate_file(&f, 0, size.next_multiple_of(512), prealloc, file);
    }
    let o = |name| opt(list, &opts, name);
    let text = |name| o(name).text.as_deref();
    let bool_opt = |name| text(name).is_some_and(|v| parse_bool(name, v).unwrap_or(false));
    let compat = match text("compat") {
        None | Some("1.1") | Some("v3") => Compat::V3,
        Some("0.10") | Some("v2") => Compat::V2,
        Some(other) => {
            return Err(err(format!(
                "{file}: Parameter 'version' does not accept value '{other}'"
            )));
        }
    };
    let prealloc =
        parse_prealloc(text("preallocation")).map_err(|m| err(format!("{file}: {m}")))?;
    let compression_type = match text("compression_type") {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => {
            return Err(err(format!(
                "{file}: Parameter 'compression-type' does not accept value '{other}'"
            )));
        }
    };
    let refcount_bits = o("refcount_bits").num.unwrap_or(16);
    let copts = CreateOptions {
        size,
        cluster_size: o("cluster_size").num.unwrap_or(65536),
        compat,
        refcount_bits: u32::try_from(refcount_bits).unwrap_or(u32::MAX),
        lazy_refcounts: bool_opt("lazy_refcounts"),
        extended_l2: bool_opt("extended_l2"),
        compression_type,
        preallocation: prealloc,
        backing_file: backing.as_deref(),
        backing_fmt: backing_fmt.as_deref(),
        data_file: text("data_file"),
        data_file_raw: bool_opt("data_file_raw"),
    };
    copts
        .validate()
        .map_err(|e| err(format!("{file}: {}", e.message())))?;
    let encryption = crate::cli::encrypt::parse_create(&|n| text(n).map(str::to_string), file)?;
    let f = open_for_create(Path::new(file), file)?;
    let mut dev = FileDevice::new(f);
    let mut bounce = [0u8; 512];
    let len = create(&mut dev, &mut bounce, &copts).map_err(|e| err(format!("{file}: {e}")))?;
    let f = dev.into_inner();
    let io = |e: std::io::Error| err(format!("{file}: {}", crate::disk::DiskError::os_text(&e)));
    f.set_len(len).map_err(io)?;
    if let Some(data) = copts.data_file {
        // Like qemu-img, the data file is created where its name points from the current directory (the
        // image will look for it relative to its own directory when opened).
        let df = open_for_create(Path::new(data), file)?;
        let data_len = size.next_multiple_of(512);
        preallocate_file(&df, 0, data_len, prealloc, file)?;
    } else if prealloc == Preallocation::Falloc {
        let _ = rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len);
    }
    f.sync_all().map_err(io)?;
    drop(f);
    if let Some(e) = encryption {
        crate::cli::encrypt::encrypt_new_image(file, &e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_on_single_commas() {
        assert_eq!(split_options("a=1,b=x,,y,c"), vec!["a=1", "b=x,y", "c"]);
    }

    #[test]
    fn formatting_line_prints_defaults_and_given_options_in_order() {
        let given = vec![
            "refcount_bits=0x8,backing_fmt=raw".to_string(),
            "cluster_size=4k".to_string(),
        ];
        let opts = parse_options("f", QCOW2_OPTS, &given).unwrap();
        assert_eq!(
            formatting_line("f", "qcow2", QCOW2_OPTS, &opts),
            "Formatting 'f', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib \
             backing_fmt=raw lazy_refcounts=off refcount_bits=8"
        );
        assert_eq!(
            parse_options("f", QCOW2_OPTS, &["lazy_refcounts=maybe".to_string()]).unwrap_err(),
            err("f: Parameter 'lazy_refcounts' expects 'on' or 'off'")
        );
        assert_eq!(
            parse_options("f", RAW_OPTS, &["cluster_size=4k".to_string()]).unwrap_err(),
            err("f: Invalid parameter 'cluster_size'")
        );
    }
}
