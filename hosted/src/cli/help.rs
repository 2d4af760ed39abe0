//! `--version` and `--help` texts, laid out as qemu-img's and qemu-io's: the version banner (this tool's name
//! and version, not QEMU's), the tool's usage with its standard options and commands, and for each command its
//! usage line and the options it takes. Only options the tool accepts are listed; their long forms are the
//! ones qemu-img accepts too.

/// `qcow2 --version` (and `-V`, also `qcow2 io -V`): two lines, as qemu-img's.
pub fn version() -> String {
    format!(
        "qcow2 version {} ({})\nCopyright (c) the {} developers; licensed under {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_LICENSE"),
    )
}

/// The commands `qcow2 --help` lists, with their one-line descriptions (qemu-img's where it has the command).
pub const COMMANDS: [(&str, &str); 16] = [
    ("amend", "Update format-specific options of the image"),
    ("bench", "Run simple image benchmark"),
    (
        "bitmap",
        "Perform modifications of the persistent bitmap in the image",
    ),
    ("check", "Check basic image integrity"),
    ("commit", "Commit image to its backing file"),
    ("compare", "Check if two images have the same contents"),
    (
        "convert",
        "Copy one image to another with optional format conversion",
    ),
    ("create", "Create and format new image file"),
    ("dd", "Copy input to output with optional format conversion"),
    ("info", "Display information about image"),
    (
        "io",
        "Run qemu-io commands on an image (qemu-io's command line)",
    ),
    ("map", "Dump image metadata"),
    ("measure", "Calculate file size requred for a new image"),
    ("rebase", "Change backing file of the image"),
    ("resize", "Resize the image to the new size"),
    ("snapshot", "List or manipulate snapshots within image"),
];

/// `qcow2 --help` (and `-h`).
pub fn main_help() -> String {
    let mut s = version();
    s.push_str(
        "qcow2 disk image utility (qemu-img and qemu-io commands for qcow2 and raw images).  Usage:

  qcow2 [standard options] COMMAND [--help | command options]

Standard options:
  -h, --help
     display this help and exit
  -V, --version
     display version info and exit

Recognized commands (run qcow2 COMMAND --help for command-specific help):

",
    );
    for (name, what) in COMMANDS {
        s.push_str(&format!("  {name} - {what}\n"));
    }
    s.push_str(
        "
Supported image formats:

  qcow2 raw

See README.md for what each command compares with.
",
    );
    s
}

/// One command's help: "Usage:", its description, its usage line(s), and its arguments.
fn command(description: &str, usage: &str, arguments: &str) -> String {
    format!(
        "Usage:\n{description}.  Usage:\n\n{usage}\nArguments:\n  -h, --help\n     print this help and exit\n{arguments}\n"
    )
}

/// `qcow2 COMMAND --help` (and `-h`); `None` for a command the tool does not have.
pub fn command_help(cmd: &str) -> Option<String> {
    let description = COMMANDS.iter().find(|(n, _)| *n == cmd)?.1;
    Some(match cmd {
        "info" => command(
            description,
            "  qcow2 info [-f FMT] [-b] [-U] [--output human|json] FILENAME\n",
            "  -f, --format FMT
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -b, --backing-chain
     also show every image of the backing chain
  -U, --force-share
     accepted for compatibility (images are opened read-only)
  --output human|json
     output format (default human)
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file name
",
        ),
        "check" => command(
            description,
            "  qcow2 check [-f FMT] [-q] [-r leaks|all] [-U] [--output human|json] FILENAME\n",
            "  -q, --quiet
     print nothing but errors
  -f, --format FMT
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -U, --force-share
     accepted for compatibility
  --output human|json
     output format (default human)
  -r, --repair leaks|all
     repair leaked clusters only, or all errors (opens the image read-write)
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file name
",
        ),
        "map" => command(
            description,
            "  qcow2 map [-f FMT] [--output human|json] [-U] FILENAME\n",
            "  -f, --format FMT
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  --output human|json
     output format (default human)
  -U, --force-share
     accepted for compatibility
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file name
",
        ),
        "compare" => command(
            description,
            "  qcow2 compare [-f FMT] [-F FMT] [-s] [-q] [-p] [-U] FILENAME1 FILENAME2\n",
            "  -q, --quiet
     print nothing; the exit code tells
  -p
     show progress
  -f, --a-format FMT
     the format of FILENAME1
  -F, --b-format FMT
     the format of FILENAME2
  --image-opts
     FILENAME1 and FILENAME2 are option strings: [driver=qcow2|raw,]file.filename=PATH
  -s, --strict
     strict mode: images of different sizes differ
  -U, --force-share
     accepted for compatibility
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME1, FILENAME2
     the images to compare
",
        ),
        "convert" => command(
            description,
            "  qcow2 convert [-f SRC_FMT] [-l SNAPSHOT_PARAMS] [-T SRC_CACHE] [-O TGT_FMT] [-o TGT_OPTS]
        [-t TGT_CACHE] [-n [--target-image-opts]] [--target-is-zero] [-B BACKING_FILENAME [-F BACKING_FMT]] [-c]
        [-S SPARSE_SIZE] [-m NUM] [-W] [-C] [-r RATE] [--salvage] [--bitmaps [--skip-broken-bitmaps]]
        [-p] [-q] [-U] SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME
",
            "  -q, --quiet
     print nothing but errors
  -p
     show progress
  -f, --source-format SRC_FMT
     the format of the sources (qcow2 or raw; probed when not given)
  -l SNAPSHOT_PARAMS
     convert an internal snapshot of the source: an ID or a name, or
     snapshot.id=ID[,snapshot.name=NAME]
  -T, --source-cache SRC_CACHE
     cache mode of the sources (checked, then read through the page cache whatever it is)
  -O TGT_FMT
     the format of TGT_FILENAME: raw (default) or qcow2
  -o TGT_OPTS
     qcow2 creation options for TGT_FILENAME (as for create)
  -c
     compress every cluster of the qcow2 output, on every core
  -t TGT_CACHE
     cache mode of the target: unsafe (the default: nothing is made durable), writeback and none
     (durable when closed), writethrough and directsync (every write made durable)
  -B, --backing BACKING_FILENAME
     make the qcow2 output an overlay of BACKING_FILENAME: only what the source's top image holds
     is copied
  -F, --backing-format BACKING_FMT
     the format of BACKING_FILENAME (required with -B)
  -n
     write into the existing TGT_FILENAME (at least as large as the sources) instead of creating it
  --target-image-opts
     TGT_FILENAME is an option string (with -n): [driver=qcow2|raw,]file.filename=PATH
  --target-is-zero
     with -n: the target reads as zeros already, so zeros are not written
  -S, --sparse-size SPARSE_SIZE
     zero runs of at least this many bytes (a multiple of 512, default 4k) are left unallocated;
     0 allocates everything
  -U, --force-share
     accepted for compatibility
  -r, --rate RATE
     copy at most RATE bytes a second
  -m, --parallel NUM
     requests in flight, 1 to 16 (default 8; 1 reads and writes one piece at a time)
  -C, --copy-range-offloading
     copy data as it is, without looking for zeros in it
  --salvage
     go on past unreadable sectors, which are written as zeros, with a warning for each
  --bitmaps
     copy the source's persistent bitmaps into the target (qcow2 version 3) after the data
  --skip-broken-bitmaps
     with --bitmaps, leave out inconsistent bitmaps (with a warning) instead of refusing
  -W, --oob-writes
     accepted (writes stay in guest order)
  SRC_FILENAME
     source image file name; several are concatenated
  TGT_FILENAME
     target image file name
",
        ),
        "dd" => command(
            description,
            "  qcow2 dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
        if=INPUT of=OUTPUT
",
            "  -f, --format FMT
     the format of INPUT (qcow2 or raw; probed when not given)
  --image-opts
     INPUT is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -O, --output-format OUTPUT_FMT
     the format of OUTPUT: raw (default) or qcow2
  -U, --force-share
     accepted for compatibility (the input is opened read-only)
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     the input ends after this many blocks (default: the whole INPUT)
  skip=COUNT
     blocks of the input to skip
  if=INPUT
     input file name
  of=OUTPUT
     output file name to create
",
        ),
        "resize" => command(
            description,
            "  qcow2 resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink] [-q]
        FILENAME [+-]SIZE[bkKMGTPE]
",
            "  -q, --quiet
     quiet operation
  -f, --format FMT
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     preallocation of the new area: off (default), metadata (qcow2), falloc, full
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)
",
        ),
        "commit" => command(
            description,
            "  qcow2 commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d] [-r RATE] [-q] [-p]
        FILENAME
",
            "  -q, --quiet
     quiet operation
  -p, --progress
     accepted for compatibility
  -f, --format FMT
     the format of FILENAME (qcow2; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -t, --cache CACHE_MODE
     accepted for compatibility
  -d, --drop
     do not empty FILENAME afterwards
  -b, --base BASE_IMG
     commit into this image of the backing chain instead of the backing file (implies --drop)
  -r, --rate RATE
     accepted for compatibility (a size)
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file name
",
        ),
        "rebase" => command(
            description,
            "  qcow2 rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u] [-c] FILENAME
",
            "  -q, --quiet
     quiet operation
  -p, --progress
     accepted for compatibility
  -f, --format FMT
     the format of FILENAME (qcow2; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -t, --cache CACHE
     accepted for compatibility
  -b, --backing BACKING_FILENAME|\"\"
     the new backing file (relative names from the image's directory), or none
  -F, --backing-format BACKING_FMT
     the new backing file's format (required with a backing file)
  -T, --backing-cache CACHE
     accepted for compatibility
  -u, --backing-unsafe
     only change the name and format: the guest may then see different data
  -c, --compress
     write the copied clusters compressed
  -U, --force-share
     accepted for compatibility
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     image file name
",
        ),
        "amend" => command(
            description,
            "  qcow2 amend [-f FMT | --image-opts] [-t CACHE] [--force] [-p] [-q] -o OPTIONS FILENAME
",
            "  -q, --quiet
     quiet operation
  -f, --format FMT
     the format of FILENAME (qcow2; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -t, --cache CACHE
     accepted for compatibility
  --force
     accepted for compatibility
  OPTIONS (after -o, --options; -p, --progress is accepted too)
     compat=0.10|1.1, lazy_refcounts=on|off, size=SIZE, data_file=NAME, data_file_raw=off;
     refcount_bits as the image has it
  FILENAME
     image file name
",
        ),
        "bitmap" => command(
            description,
            "  qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
        [-f FMT | --image-opts] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE] [--object OBJDEF]
        FILENAME BITMAP
",
            "  -f FMT
     the format of FILENAME (qcow2; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  --add
     adds BITMAP, empty and enabled (writes set its bits)
   -g, --granularity SIZE
     guest bytes one bit of the new bitmap covers: a power of 2 from 512 bytes (default: the
     cluster size, from 4 KiB to 64 KiB)
  --remove
     removes BITMAP
  --clear
     clears every bit of BITMAP
  --enable, --disable
     starts or stops setting BITMAP's bits on writes
  --merge SOURCE
     sets in BITMAP every bit that is set in bitmap SOURCE
   -b, --source-file SOURCE_FILE
     takes SOURCE from this image instead of FILENAME
   -F, --source-format SOURCE_FMT
     the format of SOURCE_FILE (probed when not given)
  FILENAME
     image file name
  BITMAP
     bitmap name
",
        ),
        "snapshot" => command(
            description,
            "  qcow2 snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT] [-q] [-U] FILENAME
",
            "  -q, --quiet
      quiet operations
  -f, --format FMT
      the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
      FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -U, --force-share
      accepted for compatibility
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name
",
        ),
        "measure" => command(
            description,
            "  qcow2 measure [-f FMT] [-o OPTIONS] [-O OUTPUT_FMT] [--output OFMT] [-l SNAPSHOT_PARAM] [-U]
       (--size SIZE | FILENAME)
",
            "  -O, --target-format FMT
     the format of the new image: raw (default) or qcow2, with -o its creation options
  --size SIZE
     measure a new image of this virtual size
  FILENAME
     measure a new image that holds the content of FILENAME
  -f, --format
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -l, --snapshot SNAPSHOT
     measure FILENAME's internal snapshot SNAPSHOT
  --output human|json
     output format
  -U, --force-share
     accepted for compatibility (the image is opened read-only)
",
        ),
        "create" => command(
            description,
            "  qcow2 create [-q] [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]] [-u]
        FILENAME [SIZE[bkKMGTPE]]
",
            "  -q, --quiet
     print nothing
  -f, --format FMT
     the format of the new image: raw (default) or qcow2
  -o, --options FMT_OPTS
     format-specific options
  -b, --backing BACKING_FILENAME
     the new image's backing file
  -F, --backing-format BACKING_FMT
     the format of BACKING_FILENAME
  -u, --backing-unsafe
     do not open BACKING_FILENAME (SIZE is then required)
  --object OBJDEF
     a QEMU object (a secret, a throttle group), checked as qemu-img checks it
  FILENAME
     the image file to create (an existing file is overwritten)
  SIZE
     virtual size, with an optional suffix (powers of 1024); taken from
     BACKING_FILENAME when not given
",
        ),
        "bench" => command(
            description,
            "  qcow2 bench [-f FMT] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]] [-q] [-U] FILENAME
",
            "  -q
     print nothing
  -f, --format FMT
     the format of FILENAME (qcow2 or raw; probed when not given)
  --image-opts
     FILENAME is an option string: [driver=qcow2|raw,]file.filename=PATH[,file.driver=file]
  -t, --cache CACHE
     cache mode: writethrough and directsync flush after every write
  -c, --count COUNT
     number of requests
  -s, --buffer-size BUFFER_SIZE
     size of each request
  -d, --depth DEPTH
     number of requests in flight
  -o, --offset OFFSET
     offset of the first request
  -S, --step-size STEP_SIZE
     distance from one request's offset to the next
  -i, --aio AIO
     accepted for compatibility (threads, native, io_uring)
  -n, --native
     accepted for compatibility
  -w, --write
     write (default: read)
  --pattern PATTERN
     the byte written
  --flush-interval FLUSH_INTERVAL
     flush after this many requests
  --no-drain
     do not wait for requests in flight before a flush
  -U, --force-share
     accepted for compatibility
  FILENAME
     image file name
",
        ),
        "io" => IO_HELP.to_string(),
        _ => return None,
    })
}

/// `qcow2 io --help` (and `-h`), laid out as qemu-io's.
const IO_HELP: &str = "Usage: qcow2 io [OPTIONS]... [-c STRING]... [file]
qcow2 disk exerciser (qemu-io's commands)

  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     the format of the image (qcow2 or raw)
  --image-opts         treat file as option string
  -r, --read-only      open the image read-only
  -n, --nocache        short for -t none
  -t, --cache=MODE     the cache mode (none, writeback, writethrough,
                       directsync, unsafe; default writethrough)
  -U, --force-share    accepted for compatibility
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'qcow2 io -c help' for information on available commands.
";
