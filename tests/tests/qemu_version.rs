//! The QEMU the harness runs: `QCOW2_QEMU_EXPECT=MAJOR.MINOR` (set by CI for each of its runs) must name the
//! version of the qemu-img the harness starts (from PATH, or from `QCOW2_QEMU_DIR`), so that a run meant for
//! one QEMU cannot silently use another. Also the text filters the harness applies against QEMU older than
//! 10, on fixed text.

use qcow2_tests::{
    drop_child_node_sections, drop_map_compressed_keys, qemu_img_ok, qemu_prints_like_10,
    qemu_version,
};

#[test]
fn qemu_in_use_is_the_expected_one() {
    let (major, minor) = qemu_version();
    let line = qemu_img_ok(["--version"])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        line.starts_with(&format!("qemu-img version {major}.{minor}")),
        "qemu_version() says {major}.{minor}, qemu-img says {line:?}"
    );
    assert_eq!(qemu_prints_like_10(), major >= 10);
    if let Some(want) = std::env::var_os("QCOW2_QEMU_EXPECT") {
        assert_eq!(
            format!("{major}.{minor}"),
            want.to_string_lossy(),
            "QCOW2_QEMU_EXPECT names another QEMU than the harness runs ({line}; QCOW2_QEMU_DIR={:?})",
            std::env::var_os("QCOW2_QEMU_DIR")
        );
    }
}

#[test]
fn child_node_sections_are_dropped_whole() {
    let ten = "\
image: a.qcow2
file format: qcow2
Format specific information:
    compat: 1.1
    corrupt: false
Child node '/file':
    filename: a.qcow2
    protocol type: file
    file length: 192 KiB (197120 bytes)
    disk size: 196 KiB

image: b.qcow2
file format: qcow2
  Child node '/file':
      filename: b.qcow2
  after: kept
";
    let seven_two = "\
image: a.qcow2
file format: qcow2
Format specific information:
    compat: 1.1
    corrupt: false

image: b.qcow2
file format: qcow2
  after: kept
";
    assert_eq!(drop_child_node_sections(ten), seven_two);
    assert_eq!(drop_child_node_sections(seven_two), seven_two);
}

#[test]
fn map_compressed_keys_are_dropped() {
    let ten = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true},
{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false}]
"#;
    let seven_two = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false}]
"#;
    assert_eq!(drop_map_compressed_keys(ten), seven_two);
}
