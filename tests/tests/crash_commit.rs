//! Power loss during `qcow2 commit`, which writes two files: the ranges the overlay holds are written into its
//! backing file (grown first when it is shorter), the backing file is closed (flushed), then the overlay is
//! emptied. Both files are recorded on one log, so a crash state is the pair of what each file holds after
//! the same moment (each file with its own unflushed writes lost, kept or torn). In every state:
//! - both files open and are consistent (an independent refcount counter; a sample through `qemu-img
//!   check`),
//! - the overlay over the backing file reads exactly as the overlay read before the commit (the guest sees
//!   the same disk whenever the power goes),
//! - the backing file alone reads, cell by cell, its old bytes or the overlay's,
//! - at the end the backing file alone reads as the overlay did, and the overlay holds nothing.

use std::cell::RefCell;
use std::rc::Rc;

use qcow2_core::engine::Source;
use qcow2_core::{BlockDevice, BlockDeviceWrite, Image};
use qcow2_tests::crash::{Event, Log, SimDevice, Survivors, crash_state};
use qcow2_tests::crash_harness::{
    Backing, CELL, Values, buffers, exactly, open_read_only, open_recorded, seeds, verify_sampled,
};
use qcow2_tests::{Scratch, guest_view, qemu_img, qemu_io_cmds};

/// The base file's device number in the log (0 is the overlay).
const BASE: u8 = 3;
/// The tool's piece size (QEMU's commit buffer).
const PIECE: u64 = 512 << 10;

/// The commit as the tool makes it, through the engine: `top` over a base of `base_fmt`, both recorded.
fn commit(top_dev: SimDevice, base_dev: SimDevice, base_fmt: &str, base_initial: &[u8]) {
    let log = top_dev.log.clone();
    let mut top = open_recorded(top_dev, Some(base_initial.to_vec()));
    let size = top.virtual_size();
    let mut ranges = Vec::new();
    let mut off = 0;
    while off < size {
        let m = top.map_guest_range(off, PIECE.min(size - off)).unwrap();
        if m.depth == 0 && !matches!(m.source, Source::Unallocated { .. }) {
            ranges.push((off, m.len, matches!(m.source, Source::Zero { .. })));
        }
        off += m.len;
    }
    let mut buf = Vec::new();
    if base_fmt == "qcow2" {
        let mut base = Image::<_, _, _, 16, 8, qcow2_core::WriteState>::open_writable(
            base_dev,
            buffers(false),
            qcow2_alloc::AllocDecompressor::default(),
            &mut Backing(None, log),
        )
        .unwrap();
        if base.virtual_size() < size {
            base.resize(size).unwrap();
        }
        for &(off, len, zero) in &ranges {
            if zero {
                base.write_zeroes(off, len, true).unwrap();
            } else {
                buf.resize(len as usize, 0);
                top.read_at(off, &mut buf).unwrap();
                base.write_at(off, &buf).unwrap();
            }
        }
        base.close().unwrap();
    } else {
        let mut base = base_dev;
        if base.size().unwrap() < size {
            base.set_size(size).unwrap();
        }
        for &(off, len, zero) in &ranges {
            buf.clear();
            buf.resize(len as usize, 0);
            if !zero {
                top.read_at(off, &mut buf).unwrap();
            }
            base.write_blocks(off / 512, &buf).unwrap();
        }
        base.flush().unwrap();
    }
    top.make_empty().unwrap();
    top.close().unwrap();
}

/// What each cell of the base may read in a crash state: its old byte (zero past its old end) or the
/// overlay's.
fn base_allowed(old: &[u8], view: &[u8], cells: usize) -> Vec<Values> {
    (0..cells)
        .map(|i| {
            let mut v = Values::default();
            v.add(old.get(i * CELL).copied().unwrap_or(0));
            v.add(view[i * CELL]);
            v
        })
        .collect()
}

fn virtual_size(qcow2: &[u8]) -> usize {
    u64::from_be_bytes(qcow2[24..32].try_into().unwrap()) as usize
}

#[test]
fn crash_safe_commit() {
    let s = Scratch::new();
    let mut total = 0;
    let base_size = 1u64 << 20;
    let size = 3u64 << 19;
    for (base_fmt, base_opts, top_opts) in [
        ("qcow2", "cluster_size=4096", "cluster_size=65536"),
        (
            "qcow2",
            "cluster_size=65536,extended_l2=on",
            "cluster_size=4096",
        ),
        ("raw", "", "cluster_size=65536,extended_l2=on"),
    ] {
        let base = s.path("base.img");
        let _ = std::fs::remove_file(&base);
        let mut args = vec!["create", "-q", "-f", base_fmt];
        if !base_opts.is_empty() {
            args.extend(["-o", base_opts]);
        }
        let base_str = base.to_str().unwrap().to_string();
        args.extend([base_str.as_str(), "1M"]);
        qcow2_tests::qemu_img_ok(&args);
        qemu_io_cmds(
            &base,
            base_fmt,
            &[
                "write -P 1 0 256k".to_string(),
                "write -P 2 768k 128k".to_string(),
            ],
        );
        let top = s.create(
            "top.qcow2",
            "qcow2",
            top_opts,
            size,
            Some(("base.img", base_fmt)),
        );
        qemu_io_cmds(
            &top,
            "qcow2",
            &[
                "write -P 3 64k 64k".to_string(),
                "write -P 4 200k 8k".to_string(),
                "write -z 768k 64k".to_string(),
                "write -P 5 900k 300k".to_string(),
                "write -P 6 1400k 4k".to_string(),
            ],
        );
        let view = guest_view(&top);
        assert_eq!(view.len() as u64, size);
        let base_old = if base_fmt == "raw" {
            std::fs::read(&base).unwrap()
        } else {
            guest_view(&base)
        };
        assert_eq!(base_old.len() as u64, base_size);
        let (top_init, base_init) = (std::fs::read(&top).unwrap(), std::fs::read(&base).unwrap());

        let log: Log = Rc::new(RefCell::new(Vec::new()));
        let dev = |data: &[u8], id| SimDevice {
            data: data.to_vec(),
            id,
            log: log.clone(),
            read_only: false,
        };
        commit(
            dev(&top_init, 0),
            dev(&base_init, BASE),
            base_fmt,
            &base_init,
        );
        let events = log.borrow().clone();
        let allowed_top = exactly(&view);
        let mut n = 0usize;
        for k in 0..=events.len() {
            if k > 0
                && !matches!(
                    events[k - 1],
                    Event::Write { dev: 0 | BASE, .. } | Event::Flush { dev: 0 | BASE }
                )
            {
                continue;
            }
            let mut kinds = vec![Survivors::None, Survivors::All];
            kinds.extend((0..seeds()).map(|r| Survivors::Random((k as u64) << 8 | r)));
            for how in kinds {
                let other = match how {
                    Survivors::Random(seed) => Survivors::Random(seed ^ 0x5eed),
                    ref same => same.clone(),
                };
                let (top_state, top_tail) = crash_state(&top_init, &events, 0, k, &how);
                let (base_state, base_tail) = crash_state(&base_init, &events, BASE, k, &other);
                if top_tail + base_tail == 0 && !matches!(how, Survivors::None) {
                    continue;
                }
                let what = format!(
                    "commit into {base_fmt} ({base_opts} / {top_opts}): crash after event {k} ({how:?})"
                );
                let sample = n.is_multiple_of(11);
                n += 1;
                // The base alone: consistent, each cell old or new.
                let base_checked = if base_fmt == "qcow2" {
                    let cells = virtual_size(&base_state) / CELL;
                    verify_sampled(
                        &s,
                        &base_state,
                        &None,
                        &base_allowed(&base_old, &view, cells),
                        &format!("{what}, the base"),
                        sample,
                    )
                } else {
                    let allowed = base_allowed(&base_old, &view, base_state.len() / CELL);
                    for (i, cell) in base_state.chunks(CELL).enumerate() {
                        assert!(
                            cell.iter().all(|&b| b == cell[0]) && allowed[i].has(cell[0]),
                            "{what}: the base at {:#x}: {:?}",
                            i * CELL,
                            &cell[..8]
                        );
                    }
                    base_state.clone()
                };
                // The overlay over that base: exactly the disk it was.
                verify_sampled(
                    &s,
                    &top_state,
                    &Some(base_checked),
                    &allowed_top,
                    &format!("{what}, the overlay"),
                    sample,
                );
            }
        }
        total += n;
        // The end: the base reads as the overlay did, the overlay holds nothing.
        let top_end = crash_state(&top_init, &events, 0, events.len(), &Survivors::None).0;
        let base_end = crash_state(&base_init, &events, BASE, events.len(), &Survivors::None).0;
        let base_view = if base_fmt == "qcow2" {
            let mut image = open_read_only(&base_end, &None).unwrap();
            let mut v = vec![0u8; image.virtual_size() as usize];
            image.read_at(0, &mut v).unwrap();
            v
        } else {
            base_end.clone()
        };
        assert!(
            base_view == view,
            "{base_fmt}: the base does not read as the overlay did"
        );
        let mut image = open_read_only(&top_end, &Some(base_end.clone())).unwrap();
        let mut off = 0;
        while off < size {
            let m = image.map_guest_range(off, size - off).unwrap();
            assert!(m.depth > 0, "the overlay still holds {m:?} at {off:#x}");
            off += m.len;
        }
        // And qemu-img agrees: both files clean, the chain reads as the overlay did.
        std::fs::write(&top, &top_end).unwrap();
        std::fs::write(&base, &base_end).unwrap();
        for (f, fmt) in [(&top, "qcow2"), (&base, base_fmt)] {
            if fmt == "qcow2" {
                let out = qemu_img(["check".as_ref(), f.as_os_str()]);
                assert_eq!(out.code, Some(0), "{}", out.describe());
            }
        }
        assert!(
            guest_view(&top) == view,
            "{base_fmt}: qemu-img reads another disk"
        );
    }
    qcow2_tests::record_evidence(
        "crash_commit",
        &format!("crash_commit: {total} crash states (pairs of files) checked, 0 violations"),
    );
    eprintln!("crash_commit: {total} crash states checked");
}
