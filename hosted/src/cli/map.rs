//! `qemu-img map`: walk the guest range extent by extent, merge neighbours, print human or JSON.

use std::io::Write;

use crate::disk::{DiskError, MapExtent, VirtualDisk};

/// Output format of `map` and `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// qemu-img's human text.
    Human,
    /// qemu-img's JSON.
    Json,
}

/// Largest range qemu-img asks block status about at a time.
const MAP_PROBE: u64 = 1 << 30;

/// Whether `next` continues `curr` in qemu-img map's eyes: same flags and depth, same file, and (when there is
/// a host offset) contiguous on the host.
pub fn mergeable(curr: &MapExtent, next: &MapExtent) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
        || curr.offset.is_some() != next.offset.is_some()
        || file_of(curr).is_some() != file_of(next).is_some()
    {
        return false;
    }
    if let (Some(a), Some(b)) = (file_of(curr), file_of(next))
        && a != b
    {
        return false;
    }
    if let (Some(a), Some(b)) = (curr.offset, next.offset)
        && a.checked_add(curr.length) != Some(b)
    {
        return false;
    }
    true
}

/// The file name qemu-img associates with an extent: only extents with a host offset have one.
fn file_of(e: &MapExtent) -> Option<&str> {
    e.offset.and(e.file.as_deref())
}

/// What went wrong while printing a map.
#[derive(Debug)]
pub enum MapError {
    /// The message qemu-img prints (after "prog: ").
    Message(String),
    /// Writing the output failed.
    Io(std::io::Error),
}

impl From<std::io::Error> for MapError {
    fn from(e: std::io::Error) -> MapError {
        MapError::Io(e)
    }
}

fn dump_entry(
    fmt: OutputFormat,
    e: &MapExtent,
    next: Option<&mut MapExtent>,
    out: &mut dyn Write,
) -> Result<(), MapError> {
    match fmt {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err(MapError::Message(
                    "File contains external, encrypted or compressed clusters.".into(),
                ));
            }
            if e.data && !e.zero {
                writeln!(
                    out,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0)),
                    file_of(e).unwrap_or("")
                )?;
            }
            // The human format does not tell zero, unallocated and zero-data apart: fold them together so that
            // more extents merge.
            if let Some(n) = next
                && (!n.data || n.zero)
            {
                n.data = false;
                n.zero = true;
            }
        }
        OutputFormat::Json => {
            write!(
                out,
                "{}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                if e.start == 0 { "[" } else { ",\n" },
                e.start,
                e.length,
                e.depth,
                e.present,
                e.zero,
                e.data,
                e.compressed
            )?;
            if let Some(o) = e.offset {
                write!(out, ", \"offset\": {o}")?;
            }
            write!(out, "}}")?;
            if next.is_none() {
                writeln!(out, "]")?;
            }
        }
    }
    Ok(())
}

/// C's `%#x`: "0" for zero, "0x..." otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// Prints the map of `disk` as `qemu-img map` does.
pub fn write_map(
    disk: &mut dyn VirtualDisk,
    fmt: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), MapError> {
    if fmt == OutputFormat::Human {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
    }
    let length = disk.virtual_size();
    let mut curr = MapExtent {
        start: 0,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        file: None,
    };
    while curr.start + curr.length < length {
        let off = curr.start + curr.length;
        let n = MAP_PROBE.min(length - off);
        let mut next = disk.map_extent(off, n).map_err(|e: DiskError| {
            MapError::Message(format!("Could not read file metadata: {e}"))
        })?;
        if next.length == 0 || next.start != off {
            return Err(MapError::Message(
                "Could not read file metadata: Input/output error".into(),
            ));
        }
        next.length = next.length.min(n);
        if next.offset.is_none() {
            next.file = None;
        }
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            dump_entry(fmt, &curr, Some(&mut next), out)?;
        }
        curr = next;
    }
    dump_entry(fmt, &curr, None, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose extents come from a list (each reported whole, at most `max_len`).
    struct ListDisk {
        size: u64,
        extents: Vec<MapExtent>,
    }

    impl VirtualDisk for ListDisk {
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            buf.fill(0);
            Ok(())
        }
        fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
            let e = self
                .extents
                .iter()
                .find(|e| e.start <= offset && offset < e.start + e.length)
                .unwrap();
            let mut r = e.clone();
            let skip = offset - e.start;
            r.start = offset;
            r.length = (e.length - skip).min(max_len);
            r.offset = e.offset.map(|o| o + skip);
            Ok(r)
        }
    }

    fn ext(
        start: u64,
        length: u64,
        depth: u32,
        present: bool,
        zero: bool,
        data: bool,
        offset: Option<u64>,
    ) -> MapExtent {
        MapExtent {
            start,
            length,
            depth,
            present,
            zero,
            data,
            compressed: false,
            offset,
            file: offset.map(|_| "t.qcow2".to_string()),
        }
    }

    fn run(disk: &mut ListDisk, fmt: OutputFormat) -> String {
        let mut out = Vec::new();
        write_map(disk, fmt, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn merges_contiguous_and_splits_discontiguous() {
        let k = 65536;
        let mut disk = ListDisk {
            size: 8 * k,
            extents: vec![
                ext(0, k, 0, true, false, true, Some(5 * k)),
                ext(k, k, 0, true, false, true, Some(6 * k)), // contiguous: merges
                ext(2 * k, k, 0, true, false, true, Some(3 * k)), // not contiguous
                ext(3 * k, k, 0, false, true, false, None),
                ext(4 * k, k, 0, false, true, false, None), // merges with the previous
                ext(5 * k, k, 0, true, true, false, None),  // zero cluster: present
                ext(6 * k, 2 * k, 1, true, false, true, Some(0)),
            ],
        };
        let json = run(&mut disk, OutputFormat::Json);
        assert_eq!(
            json,
            "[{ \"start\": 0, \"length\": 131072, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680},
{ \"start\": 131072, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 196608},
{ \"start\": 196608, \"length\": 131072, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 327680, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 393216, \"length\": 131072, \"depth\": 1, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}]
"
        );
        let human = run(&mut disk, OutputFormat::Human);
        assert_eq!(
            human,
            "Offset          Length          Mapped to       File
0               0x20000         0x50000         t.qcow2
0x20000         0x10000         0x30000         t.qcow2
0x60000         0x20000         0               t.qcow2
"
        );
    }

    #[test]
    fn empty_disk_prints_one_empty_entry() {
        let mut disk = ListDisk {
            size: 0,
            extents: vec![],
        };
        assert_eq!(
            run(&mut disk, OutputFormat::Json),
            "[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}]\n"
        );
        assert_eq!(
            run(&mut disk, OutputFormat::Human),
            "Offset          Length          Mapped to       File\n"
        );
    }

    #[test]
    fn human_refuses_compressed() {
        let mut e = ext(0, 65536, 0, true, false, true, None);
        e.compressed = true;
        let mut disk = ListDisk {
            size: 65536,
            extents: vec![e],
        };
        let mut out = Vec::new();
        match write_map(&mut disk, OutputFormat::Human, &mut out) {
            Err(MapError::Message(m)) => assert_eq!(
                m,
                "File contains external, encrypted or compressed clusters."
            ),
            other => panic!("{other:?}"),
        }
    }
}
