//! Compressed writes on images whose refcounts are narrow (`refcount_bits` 1, 2 and 4): several compressed
//! clusters share a host cluster only while its refcount can count them; past the largest value the width
//! holds, the next compressed cluster starts a new host cluster (as QEMU does), never "refcount overflow".
//! The same writes go through qemu-io into a twin; `qemu-img check` must find ours clean and `qemu-img
//! compare` the two equal.

use std::ffi::OsStr;

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_io_cmds};

fn run(refcount_bits: u32) {
    let s = Scratch::new();
    let opts = format!("cluster_size=65536,refcount_bits={refcount_bits}");
    let ours = s.qcow2("ours.qcow2", &opts, 64 << 20);
    let twin = s.qcow2("twin.qcow2", &opts, 64 << 20);
    // 24 clusters of compressible data: each compresses to far less than a cluster, so without the limit
    // they would all share one or two host clusters.
    let cmds: Vec<String> = (0..24u64)
        .map(|i| format!("write -c -P {} {} 65536", 0x20 + i, i * 3 * 65536))
        .collect();
    let mut args: Vec<&OsStr> = vec![OsStr::new("io"), OsStr::new("-f"), OsStr::new("qcow2")];
    for c in &cmds {
        args.push(OsStr::new("-c"));
        args.push(OsStr::new(c));
    }
    args.push(ours.as_os_str());
    let out = qcow2(&args);
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        out.success() && !text.contains("failed"),
        "refcount_bits={refcount_bits}: compressed writes failed:\n{}",
        out.describe()
    );
    qemu_io_cmds(&twin, "qcow2", &cmds);
    let check = qemu_img([OsStr::new("check"), ours.as_os_str()]);
    assert_eq!(
        check.code,
        Some(0),
        "refcount_bits={refcount_bits}: qemu-img check:\n{}",
        check.describe()
    );
    let cmp = qemu_img([OsStr::new("compare"), ours.as_os_str(), twin.as_os_str()]);
    assert_eq!(
        cmp.code,
        Some(0),
        "refcount_bits={refcount_bits}: qemu-img compare:\n{}",
        cmp.describe()
    );
    // The clusters really are compressed (not written plainly after a refusal).
    let map = qemu_img([
        OsStr::new("map"),
        OsStr::new("--output=json"),
        ours.as_os_str(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    let compressed = v
        .as_array()
        .expect("map array")
        .iter()
        .filter(|e| e["compressed"] == serde_json::Value::Bool(true))
        .count();
    assert!(
        compressed >= 24,
        "refcount_bits={refcount_bits}: only {compressed} compressed extents:\n{v}"
    );
}

#[test]
fn refcount_bits_1() {
    run(1);
}

#[test]
fn refcount_bits_2() {
    run(2);
}

#[test]
fn refcount_bits_4() {
    run(4);
}
