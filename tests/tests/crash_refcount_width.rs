//! Power loss while the refcount width changes (`amend -o refcount_bits=N`): every crash state opens, is
//! consistent for an independent refcount counter and for `qemu-img check` (leaks allowed), reads the same
//! data, and has the old width or the new one; after the close, the new one. The crash states are built as in
//! `crash_write`.

use qcow2_tests::crash_harness::{exactly, open_recorded, states_of, verify_sampled};
use qcow2_tests::{Scratch, guest_view, qemu_img, qemu_io_cmds};

fn refcount_order(state: &[u8]) -> u32 {
    u32::from_be_bytes(state[96..100].try_into().unwrap())
}

#[test]
fn crash_refcount_width() {
    let s = Scratch::new();
    let mut total = 0;
    for (opts, snapshot, order) in [
        ("cluster_size=4096", true, 3u32),
        ("cluster_size=4096", true, 6),
        ("cluster_size=4096", false, 1),
        ("cluster_size=512", false, 0),
        (
            "cluster_size=4096,refcount_bits=64,lazy_refcounts=on",
            true,
            4,
        ),
    ] {
        let img = s.qcow2("w.qcow2", opts, 4 << 20);
        qemu_io_cmds(
            &img,
            "qcow2",
            &[
                "write -P 1 0 256k".to_string(),
                "write -P 2 3M 64k".to_string(),
            ],
        );
        if snapshot {
            qemu_img(["snapshot", "-c", "s", img.to_str().unwrap()]);
            qemu_io_cmds(&img, "qcow2", &["write -P 3 64k 64k".to_string()]);
        }
        let initial = std::fs::read(&img).unwrap();
        let old = refcount_order(&initial);
        let allowed = exactly(&guest_view(&img));
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, None);
            let mut table = vec![0u8; 1 << 20];
            image.change_refcount_order(order, &mut table).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, how)) in states.iter().enumerate() {
            let what = format!("refcount order {old} -> {order} ({opts}): {how}");
            total += 1;
            let checked =
                verify_sampled(&s, state, &None, &allowed, &what, i == last || i % 3 == 0);
            let now = refcount_order(&checked);
            if i == last {
                assert_eq!(now, order, "{what}");
            } else {
                assert!(now == old || now == order, "{what}: refcount order {now}");
            }
        }
    }
    qcow2_tests::record_evidence(
        "crash_refcount_width",
        &format!("crash_refcount_width: {total} crash states checked, 0 violations"),
    );
}
