//! `check` and `repair` against qemu-img check: for every case of `qcow2_tests::damage`, the same exit codes,
//! messages, counts and JSON; after repair both tools see the same state and the same guest data. Plus
//! core-level runs with a small scratch buffer (several passes) giving the same results as one pass.

use qcow2_core::MemDevice;
use qcow2_core::check::{self, CheckReport, CheckSink, Problem, RepairMode};
use qcow2_tests::Scratch;
use qcow2_tests::damage::{cases, run_case};

macro_rules! damage_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name));
            }
        )*

        /// Every case has a test above.
        #[test]
        fn every_case_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for c in cases() {
                assert!(tested.contains(&c.name), "damage case {} has no test", c.name);
            }
            assert_eq!(tested.len(), cases().len());
        }
    };
}

damage_tests!(
    clean_plain,
    clean_snapshot,
    clean_compressed,
    clean_extended_l2,
    clean_small_clusters,
    clean_refcount_bits_1,
    clean_refcount_bits_8,
    clean_refcount_bits_64,
    clean_v2,
    leaked_cluster,
    leaked_clusters_at_end,
    refcount_too_high_shared,
    refcount_too_low,
    refcount_zero_used,
    refcount_zero_l2_table,
    copied_flag_cleared_l2,
    copied_flag_set_on_shared,
    copied_flag_cleared_l1,
    l1_reserved_bits,
    l2_reserved_bits,
    l2_data_unaligned,
    l2_prealloc_unaligned,
    l1_unaligned,
    extl2_bad_bitmap,
    extl2_unallocated_with_alloc_bits,
    missing_refcount_block,
    refcount_table_reserved_bits,
    refcount_block_unaligned,
    compressed_copied_flag,
    compressed_refcount_low,
    snapshot_l2_refcount_low,
    dirty_with_leak,
    corrupt_bit_clean,
    data_past_end,
    lazy_refcounts_crash,
    rebuild_small_clusters,
    bitmaps_clean,
    bitmap_directory_leaked,
    extl2_prealloc_unaligned,
    two_entries_one_cluster,
    overflow_refcount_bits_1,
    snapshot_l1_unaligned,
    leak_refcount_bits_4,
    clean_data_file,
    data_file_copied_cleared,
);

#[derive(Default)]
struct Lines(Vec<String>);

impl CheckSink for Lines {
    fn report(&mut self, p: Problem) {
        self.0.push(p.to_string());
    }
}

fn core_check(bytes: &[u8], scratch_len: usize) -> (CheckReport, Vec<String>) {
    let mut dev = MemDevice::new(bytes);
    let mut bounce = [0u8; 512];
    let mut scratch = vec![0u8; scratch_len];
    let mut lines = Lines::default();
    let r = check::check(&mut dev, &mut bounce, &mut scratch, &mut lines);
    (r.unwrap_or_default(), lines.0)
}

fn core_repair(
    bytes: &[u8],
    scratch_len: usize,
    mode: RepairMode,
) -> (Result<CheckReport, String>, Vec<String>, Vec<u8>) {
    let mut buf = bytes.to_vec();
    buf.resize(bytes.len() + (4 << 20), 0);
    let mut dev = MemDevice::with_len(buf, bytes.len() as u64, 512);
    let mut bounce = [0u8; 512];
    let mut scratch = vec![0u8; scratch_len];
    let mut lines = Lines::default();
    let r = check::repair(&mut dev, &mut bounce, &mut scratch, mode, &mut lines)
        .map(|r| CheckReport { passes: 0, ..r })
        .map_err(|e| format!("{e:?}"));
    (r, lines.0, dev.content().to_vec())
}

fn same_but_passes(a: &CheckReport, b: &CheckReport) -> bool {
    CheckReport { passes: 0, ..*a } == CheckReport { passes: 0, ..*b }
}

/// Every damage case, checked and repaired by the core with the smallest scratch (many passes) and with a
/// large one (one pass): same reports, same problems, same repaired bytes.
#[test]
fn small_scratch_gives_the_same_results() {
    let s = Scratch::new();
    let mut multi = 0;
    for case in cases() {
        let img = (case.build)(&s);
        let bytes = std::fs::read(&img).unwrap();
        let min = {
            let mut dev = MemDevice::new(&bytes[..]);
            check::min_scratch_len(&mut dev, &mut [0u8; 512]).unwrap()
        };
        let one = {
            let mut dev = MemDevice::new(&bytes[..]);
            check::scratch_len_for_one_pass(&mut dev, &mut [0u8; 512]).unwrap()
        };
        let (big, mut big_lines) = core_check(&bytes, one);
        assert_eq!(
            big.passes, 1,
            "{}: one pass expected with {one} bytes",
            case.name
        );
        // Three clusters a pass.
        let (small, mut small_lines) = core_check(&bytes, 12);
        if small.passes > 1 {
            multi += 1;
        }
        assert!(
            same_but_passes(&big, &small),
            "{}: {big:?} vs {small:?}",
            case.name
        );
        big_lines.sort();
        small_lines.sort();
        assert_eq!(big_lines, small_lines, "{}: problems differ", case.name);
        for mode in [RepairMode::Leaks, RepairMode::All] {
            let (rb, mut lb, bb) = core_repair(&bytes, one, mode);
            let small = if mode == RepairMode::All { min } else { 12 };
            let (rs, mut ls, bs) = core_repair(&bytes, small, mode);
            assert_eq!(rb, rs, "{} {mode:?}", case.name);
            lb.sort();
            ls.sort();
            assert_eq!(lb, ls, "{} {mode:?}: problems differ", case.name);
            assert!(bb == bs, "{} {mode:?}: repaired images differ", case.name);
        }
    }
    assert!(multi >= 5, "only {multi} cases needed several passes");
}

/// A scratch buffer smaller than one count is refused, not misused.
#[test]
fn tiny_scratch_is_an_error() {
    let s = Scratch::new();
    let img = (cases()[0].build)(&s);
    let bytes = std::fs::read(&img).unwrap();
    let mut dev = MemDevice::new(&bytes[..]);
    let mut bounce = [0u8; 512];
    let mut scratch = [0u8; 3];
    let r = check::check(&mut dev, &mut bounce, &mut scratch, &mut check::NoSink);
    assert!(
        matches!(r, Err(qcow2_core::Error::BufferTooSmall { .. })),
        "{r:?}"
    );
}

/// `-q` prints nothing but keeps the exit code; a raw image is "not supported" (63) like qemu-img says.
#[test]
fn quiet_and_unsupported() {
    let s = Scratch::new();
    let img = s.path("raw.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let o = qcow2_tests::qcow2(["check".as_ref(), img.as_os_str()]);
    let q = qcow2_tests::qemu_img(["check".as_ref(), img.as_os_str()]);
    assert_eq!(o.code, Some(63), "{}", o.describe());
    assert_eq!(o.code, q.code);
    assert_eq!(
        o.stderr_str().trim_start_matches("qcow2: "),
        q.stderr_str().trim_start_matches("qemu-img: ")
    );
    for case in ["leaked_cluster", "l2_reserved_bits", "clean_plain"] {
        let c = cases().into_iter().find(|c| c.name == case).unwrap();
        let img = (c.build)(&s);
        let o = qcow2_tests::qcow2(["check".as_ref(), "-q".as_ref(), img.as_os_str()]);
        let q = qcow2_tests::qemu_img(["check".as_ref(), "-q".as_ref(), img.as_os_str()]);
        assert_eq!(o.code, q.code, "{case}");
        assert_eq!(o.stdout_str(), q.stdout_str(), "{case}");
        assert_eq!(o.stderr_str(), q.stderr_str(), "{case}");
    }
}

/// Metadata bytes overwritten at random (header kept parseable): check and both repairs end with a report or
/// an error, never a panic or a hang, and a repaired image checks clean or reports what it cannot fix.
#[test]
fn random_damage_never_panics() {
    let s = Scratch::new();
    let mut images = Vec::new();
    for name in [
        "clean_snapshot",
        "clean_compressed",
        "clean_extended_l2",
        "bitmaps_clean",
    ] {
        let c = cases().into_iter().find(|c| c.name == name).unwrap();
        images.push(std::fs::read((c.build)(&s)).unwrap());
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..400 {
        let base = &images[round % images.len()];
        let mut bytes = base.clone();
        // Metadata lives in the first clusters and in the L2/refcount clusters: hit anywhere past the
        // 104-byte header fields, a few words at a time.
        for _ in 0..1 + next() % 8 {
            let at = 104 + (next() as usize) % (bytes.len() - 112);
            let at = at & !7;
            let word = match next() % 4 {
                0 => next(),
                1 => next() & 0x00ff_ffff_ffff_fe00,
                2 => (next() % 64) << 16,
                _ => 0,
            };
            bytes[at..at + 8].copy_from_slice(&word.to_be_bytes());
        }
        let _ = core_check(&bytes, 64);
        let _ = core_check(&bytes, 1 << 20);
        for mode in [RepairMode::Leaks, RepairMode::All] {
            let (r, _, repaired) = core_repair(&bytes, 1 << 20, mode);
            if mode == RepairMode::All
                && let Ok(r) = r
                && r.check_errors == 0
            {
                // Whatever was left must be what a fresh check finds.
                let (again, _) = core_check(&repaired, 1 << 20);
                assert_eq!(again.corruptions, r.corruptions, "round {round}");
                assert_eq!(again.leaks, r.leaks, "round {round}");
            }
        }
    }
}

/// Every malformed image of `qcow2_tests::malformed`: `check` and `check -r all` finish in time without a
/// panic, and where both tools get to check the image, they agree on the exit code.
#[test]
fn malformed_images() {
    let mut disagree = Vec::new();
    for case in qcow2_tests::malformed::cases() {
        let s = Scratch::new();
        let img = case.build(&s);
        let o = qcow2_tests::qcow2(["check".as_ref(), img.as_os_str()]);
        // QEMU itself loops on some of these (backing loops): give it a short limit.
        let q = qcow2_tests::run_qemu_tool_limited(
            "qemu-img",
            &["check".as_ref(), "-U".as_ref(), img.as_os_str()],
            std::time::Duration::from_secs(10),
        );
        let checked = |c: Option<i32>| matches!(c, Some(0) | Some(2) | Some(3));
        if checked(o.code) && checked(q.code) && o.code != q.code {
            disagree.push(format!(
                "{}: ours {:?}, qemu-img {:?}",
                case.name, o.code, q.code
            ));
        }
        let copy = s.path("repair.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let _ = qcow2_tests::qcow2([
            "check".as_ref(),
            "-r".as_ref(),
            "all".as_ref(),
            copy.as_os_str(),
        ]);
    }
    assert!(disagree.is_empty(), "{disagree:#?}");
}
