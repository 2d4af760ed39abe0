use super::*;

/// A disk in memory; as an output it records which clusters were written compressed.
struct Mem {
    data: Vec<u8>,
    compressed: Vec<u64>,
}

impl VirtualDisk for Mem {
    fn virtual_size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn map_extent(&mut self, offset: u64, max_len: u64) -> Result<MapExtent, DiskError> {
        // Whole 4 KiB blocks: data unless all zero.
        let o = offset as usize;
        let end = ((o / 4096 + 1) * 4096).min(o + max_len as usize);
        let zero = self.data[o..end].iter().all(|&b| b == 0);
        Ok(MapExtent {
            start: offset,
            length: (end - o) as u64,
            depth: 0,
            present: !zero,
            zero,
            data: !zero,
            compressed: false,
            offset: None,
            file: None,
        })
    }
}

impl VirtualDiskWrite for Mem {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, true)
    }
    fn compressed_cluster_size(&self) -> Result<u64, DiskError> {
        Ok(4096)
    }
    fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.compressed.push(offset);
        self.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn close(self: Box<Self>) -> Result<(), DiskError> {
        Ok(())
    }
}

#[test]
fn copies_into_any_writable_disk() {
    let mut data = vec![0u8; 40_000];
    data[100..200].fill(7);
    data[20_000..30_000].fill(9);
    data[39_999] = 1;
    for compress in [false, true] {
        let mut src = Mem {
            data: data.clone(),
            compressed: Vec::new(),
        };
        let mut dst = Mem {
            data: vec![0u8; 40_448],
            compressed: Vec::new(),
        };
        let mut out = Vec::new();
        let opts = CopyOptions {
            compress,
            cache: CacheMode::WRITEBACK,
            ..CopyOptions::default()
        };
        let mut prog = Progress::new(false, 1.0);
        copy_guest_data(&mut src, &mut dst, opts, &mut prog, &mut out).unwrap();
        assert!(dst.data[..40_000] == data[..]);
        if compress {
            // Clusters 0, 4..7 and the last (partial) one hold data.
            assert_eq!(dst.compressed, [0, 16384, 20480, 24576, 28672, 36864]);
        } else {
            assert!(dst.compressed.is_empty());
        }
    }
}

fn sectors(pattern: &[u8]) -> Vec<u8> {
    pattern
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b, 512))
        .collect()
}

#[test]
fn zero_runs_align_like_qemu() {
    // 8 data sectors, 8 zero sectors: two aligned runs.
    let buf = sectors(&[1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(allocated_run(&buf, 16, 0, 8), (true, 8));
    assert_eq!(allocated_run(&buf[8 * 512..], 8, 8, 8), (false, 8));
    // A data run ending mid-block is extended to the block end.
    let buf = sectors(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(allocated_run(&buf, 16, 0, 8), (true, 8));
    // A zero run ending mid-block is cut back to the block start.
    let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
    assert_eq!(allocated_run(&buf, 16, 0, 8), (false, 8));
    // A zero run that is only a block's tail is data.
    let buf = sectors(&[0, 0, 1, 1]);
    assert_eq!(allocated_run(&buf, 4, 5, 8), (true, 3));
    assert_eq!(allocated_run(&buf, 4, 6, 8), (false, 2));
}

#[test]
fn short_zero_gaps_stay_in_the_write() {
    let buf = sectors(&[
        1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ]);
    assert_eq!(allocated_run_min(&buf, 32, 8, 0, 8), (true, 16));
    let buf = sectors(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(allocated_run_min(&buf, 16, 8, 0, 8), (false, 16));
}
