//! Power loss while an image grows with its new clusters preallocated (`resize --preallocation=falloc|full`:
//! new refcount structures and a new refcount table after the last cluster in use, the old table freed, the
//! data clusters in one run, the L2 entries, the size last). Every crash state opens, has no refcount below
//! its references (an independent counter; a sample through `qemu-img check`), and is the old disk (old
//! size, old data) or the new one (new size, the old data, zeros after).

use qcow2_tests::crash_harness::{exactly, open_recorded, states_of, verify_sampled};
use qcow2_tests::{Scratch, guest_view, qemu_io_cmds};

#[test]
fn crash_resize_preallocated() {
    struct Case {
        name: &'static str,
        opts: &'static str,
        size: u64,
        new_size: u64,
        backing: bool,
        zeros: bool,
    }
    let cases = [
        Case {
            name: "falloc, 4 KiB clusters, unaligned old end",
            opts: "cluster_size=4096",
            size: (1 << 20) - 1536,
            new_size: 3 << 20,
            backing: false,
            zeros: false,
        },
        Case {
            name: "full, 512-byte clusters, many refcount blocks",
            opts: "cluster_size=512",
            size: 256 << 10,
            new_size: 4 << 20,
            backing: false,
            zeros: true,
        },
        Case {
            name: "falloc, extended L2 over a longer backing file",
            opts: "cluster_size=65536,extended_l2=on",
            size: 1 << 20,
            new_size: 3 << 20,
            backing: true,
            zeros: false,
        },
        Case {
            name: "full, lazy refcounts",
            opts: "cluster_size=4096,lazy_refcounts=on",
            size: 1 << 20,
            new_size: 2 << 20,
            backing: false,
            zeros: true,
        },
    ];
    let mut total = 0;
    for c in cases {
        let s = Scratch::new();
        let img = s.path("r.qcow2");
        let mut base_bytes = None;
        if c.backing {
            let base = s.qcow2("base.qcow2", "", 4 << 20);
            qemu_io_cmds(&base, "qcow2", &["write -P 0x33 0 4M".to_string()]);
            base_bytes = Some(std::fs::read(&base).unwrap());
            s.create(
                "r.qcow2",
                "qcow2",
                c.opts,
                c.size,
                Some(("base.qcow2", "qcow2")),
            );
        } else {
            s.qcow2("r.qcow2", c.opts, c.size);
        }
        // Data one byte value per 16 KiB, the last sector written, and a freed cluster left inside the file.
        let mut cmds = Vec::new();
        let mut at = 0;
        while at + 4096 <= c.size {
            cmds.push(format!("write -P {} {at} 4096", (at / 16384) % 250 + 1));
            at += 16384;
        }
        cmds.push(format!("write -P 0x77 {} 512", c.size - 512));
        cmds.push("discard 16k 4k".to_string());
        qemu_io_cmds(&img, "qcow2", &cmds);
        let initial = std::fs::read(&img).unwrap();
        let old = guest_view(&img);
        let mut new = old.clone();
        new.resize(c.new_size as usize, 0);
        let (old_cells, new_cells) = (exactly(&old), exactly(&new));
        let log_base = base_bytes.clone();
        let states = states_of(&initial, |dev| {
            let mut image = open_recorded(dev, log_base);
            image.resize_preallocated(c.new_size, c.zeros).unwrap();
            image.close().unwrap();
        });
        let last = states.len() - 1;
        for (i, (state, what)) in states.iter().enumerate() {
            let what = format!("resize {}: {what}", c.name);
            let size = u64::from_be_bytes(state[24..32].try_into().unwrap());
            let allowed = if size == c.size && i != last {
                &old_cells
            } else if size == c.new_size {
                &new_cells
            } else {
                panic!("{what}: virtual size {size} is neither the old nor the new one");
            };
            total += 1;
            verify_sampled(
                &s,
                state,
                &base_bytes,
                allowed,
                &what,
                i == last || i % 17 == 0,
            );
        }
        eprintln!("resize {}: {} crash states", c.name, states.len());
    }
    qcow2_tests::record_evidence(
        "crash_preallocate",
        &format!("crash_preallocate: {total} crash states checked, 0 violations"),
    );
}
