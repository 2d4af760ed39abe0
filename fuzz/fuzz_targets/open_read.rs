//! Arbitrary bytes as a qcow2 image in memory: open it with no backing or data files and an `Inflate` with a
//! 32 KiB window and a 512-byte input buffer, map the disk run by run, and read it. Errors are fine; panics,
//! hangs and wrong bytes are bugs.
//!
//! The work is bounded whatever the header claims (a virtual size of 2^62 must not make one input slow): at
//! most `MAX_RUNS` mapping steps and `MAX_READ` bytes read.
//!
//! Oracles: every run `map_guest_range` returns is non-empty and no longer than asked; bytes read from a run
//! of plain data equal the device's bytes at its host offset (zeros past the device's end); zero and
//! unallocated runs read as zeros; reads past the virtual disk fail.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_core::{Buffers, Image, Inflate, MemDevice, NoFiles, Source};

const MAX_RUNS: usize = 256;
const MAX_READ: usize = 256 * 1024;
const CHUNK: usize = 4096;

fn device_bytes(data: &[u8], host: u64, out: &mut [u8]) {
    out.fill(0);
    let Ok(start) = usize::try_from(host) else {
        return;
    };
    if let Some(avail) = data.get(start..) {
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bounce = [0u8; 512];
    let mut metadata = [0u8; 8 * 512];
    let mut window = vec![0u8; 32 * 1024];
    let mut input = [0u8; 512];
    let buffers = Buffers {
        bounce: &mut bounce[..],
        metadata: &mut metadata[..],
    };
    let inflate = Inflate::new(&mut window[..], &mut input[..]);
    let Ok(mut image) =
        Image::<_, _, _>::open(MemDevice::new(data), buffers, inflate, &mut NoFiles)
    else {
        return;
    };
    let size = image.virtual_size();

    // Out of range reads fail.
    let mut one = [0u8; 2];
    assert!(
        image.read_at(size, &mut one[..1]).is_err(),
        "read at the virtual size succeeded"
    );
    if size > 0 {
        assert!(
            image.read_at(size - 1, &mut one).is_err(),
            "read across the virtual size succeeded"
        );
    }
    assert!(
        image.read_at(u64::MAX, &mut one[..1]).is_err(),
        "read at u64::MAX succeeded"
    );
    assert!(
        image.map_guest_range(size, 1).is_err(),
        "map at the virtual size succeeded"
    );

    // Walk the mapping; read the head of each run and check it against what the run says it is.
    let mut buf = vec![0u8; CHUNK];
    let mut expect = vec![0u8; CHUNK];
    let mut read_budget = MAX_READ;
    let mut pos = 0u64;
    for _ in 0..MAX_RUNS {
        if pos >= size {
            break;
        }
        let want = size - pos;
        let m = match image.map_guest_range(pos, want) {
            Ok(m) => m,
            Err(_) => break,
        };
        assert!(
            m.len >= 1 && m.len <= want,
            "run of {} bytes for a request of {want}",
            m.len
        );
        assert_eq!(
            m.depth, 0,
            "a chain without backing files mapped to depth {}",
            m.depth
        );
        let n = usize::try_from(m.len)
            .unwrap_or(usize::MAX)
            .min(CHUNK)
            .min(read_budget);
        if n > 0 {
            read_budget -= n;
            if image.read_at(pos, &mut buf[..n]).is_ok() {
                match m.source {
                    Source::Data {
                        host,
                        external: false,
                    } => {
                        device_bytes(data, host, &mut expect[..n]);
                        assert!(
                            buf[..n] == expect[..n],
                            "data run at guest {pos:#x} host {host:#x} read wrong bytes"
                        );
                    }
                    Source::Data { external: true, .. } => {
                        panic!("external data without a data file")
                    }
                    Source::Zero { .. } | Source::Unallocated { .. } | Source::PastEnd { .. } => {
                        assert!(
                            buf[..n].iter().all(|&b| b == 0),
                            "zero run at guest {pos:#x} read non-zero bytes"
                        );
                    }
                    Source::Compressed { .. } => {}
                }
            }
        }
        pos = pos.saturating_add(m.len);
    }

    // Read the start of the disk sequentially, in chunks that straddle cluster boundaries.
    let mut pos = 0u64;
    while pos < size && read_budget > 0 {
        let n = usize::try_from(size - pos)
            .unwrap_or(usize::MAX)
            .min(CHUNK - 1)
            .min(read_budget);
        read_budget -= n;
        if image.read_at(pos, &mut buf[..n]).is_err() {
            break;
        }
        pos += n as u64;
    }
});
