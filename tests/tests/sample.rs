//! The shipped sample image (samples/sample.qcow2): our conversion, info and map equal qemu-img's, and
//! samples/make-sample.sh recreates it.

use std::path::PathBuf;
use std::process::Command;

use qcow2_tests::{Scratch, check_image, qemu_env, qemu_img};

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("samples")
}

#[test]
fn sample_converts_like_qemu() {
    let s = Scratch::new();
    let sample = samples().join("sample.qcow2");
    assert!(sample.exists(), "{} is missing", sample.display());
    check_image(&s, &sample);
}

#[test]
fn sample_script_recreates_sample() {
    let s = Scratch::new();
    let out = s.path("sample.qcow2");
    let mut sh = Command::new("sh");
    qemu_env(&mut sh); // the script runs qemu-img and qemu-io by name
    let status = sh
        .arg(samples().join("make-sample.sh"))
        .arg(&out)
        .status()
        .expect("run make-sample.sh");
    assert!(status.success(), "make-sample.sh failed");
    let cmp = qemu_img([
        "compare".as_ref(),
        "-q".as_ref(),
        out.as_os_str(),
        samples().join("sample.qcow2").as_os_str(),
    ]);
    assert_eq!(
        cmp.code,
        Some(0),
        "recreated sample differs in content:\n{}",
        cmp.describe()
    );
}
