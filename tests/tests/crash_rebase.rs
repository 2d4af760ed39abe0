//! Power loss during a safe rebase (`qcow2 rebase -b NEW`) as the tool makes it through the engine: the
//! clusters where the old chain and the new backing file differ are written into the overlay, then the
//! first cluster is rewritten to name the new backing file. The guest must see the same disk in every crash
//! state, through whichever backing file the state's header names; every state is consistent (an independent
//! refcount counter and `qemu-img check`).

use qcow2_core::write::BackingFile;
use qcow2_tests::crash_harness::{CELL, exactly, open_recorded, states_of, verify_sampled};
use qcow2_tests::{Scratch, guest_view, qemu_io_cmds};

/// The backing file name a state's header stores.
fn backing_name(state: &[u8]) -> String {
    let at = u64::from_be_bytes(state[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(state[16..20].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&state[at..at + len]).into_owned()
}

#[test]
fn crash_safe_rebase() {
    let s = Scratch::new();
    let size = 1u64 << 20;
    let mut total = 0;
    for opts in ["cluster_size=4096", "cluster_size=65536,extended_l2=on"] {
        let old = s.qcow2("old.qcow2", "cluster_size=65536", size);
        qemu_io_cmds(&old, "qcow2", &["write -P 1 0 512k".to_string()]);
        let new = s.qcow2("new.qcow2", "cluster_size=65536", size);
        qemu_io_cmds(
            &new,
            "qcow2",
            &[
                "write -P 1 0 128k".to_string(),
                "write -P 2 640k 128k".to_string(),
            ],
        );
        let top = s.create(
            "top.qcow2",
            "qcow2",
            opts,
            size,
            Some(("old.qcow2", "qcow2")),
        );
        qemu_io_cmds(&top, "qcow2", &["write -P 3 64k 128k".to_string()]);
        let view = guest_view(&top);
        let new_view = guest_view(&new);
        let (old_bytes, new_bytes) = (std::fs::read(&old).unwrap(), std::fs::read(&new).unwrap());
        let initial = std::fs::read(&top).unwrap();
        let allowed = exactly(&view);
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, Some(old_bytes.clone()));
            // Where the new backing file reads otherwise, the overlay takes the old chain's bytes (runs of
            // differing cells, as the tool copies whole pieces).
            let differs: Vec<bool> = view
                .chunks(CELL)
                .zip(new_view.chunks(CELL))
                .map(|(a, b)| a != b)
                .collect();
            let mut i = 0;
            while i < differs.len() {
                if !differs[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < differs.len() && differs[i] && i - start < 512 {
                    i += 1;
                }
                let run = &view[start * CELL..i * CELL];
                image.write_at((start * CELL) as u64, run).unwrap();
            }
            image
                .set_backing_file(Some(BackingFile {
                    name: "new.qcow2",
                    format: Some("qcow2"),
                }))
                .unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, how)) in states.iter().enumerate() {
            let what = format!("rebase ({opts}): {how}");
            total += 1;
            let name = backing_name(state);
            let base = match name.as_str() {
                "old.qcow2" => old_bytes.clone(),
                "new.qcow2" => new_bytes.clone(),
                other => panic!("{what}: backing file name {other:?}"),
            };
            if i == last {
                assert_eq!(name, "new.qcow2", "{what}");
            }
            verify_sampled(
                &s,
                state,
                &Some(base),
                &allowed,
                &what,
                i == last || i % 7 == 0,
            );
        }
    }
    qcow2_tests::record_evidence(
        "crash_rebase",
        &format!("crash_rebase: {total} crash states checked, 0 violations"),
    );
}
