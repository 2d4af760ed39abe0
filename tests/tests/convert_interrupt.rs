//! An interrupted `qcow2 convert` never leaves a qcow2 destination that `qemu-img check` calls corrupt: the
//! conversion is killed (SIGKILL) at several points of its run, plain and compressed, with the parallel copy
//! (the default) and the serial one (`-m 1`); the destination may leak clusters, nothing else. Killing it
//! is a crash in which every write made so far reached the file, in order; the power-loss simulator
//! (`crash_write`) covers the orders a host crash allows.

use std::process::{Command, Stdio};
use std::time::Instant;

use qcow2_tests::{Scratch, noise, qcow2_bin, qemu_img, text, write_at};

#[test]
fn killed_conversions_leave_no_corruption() {
    let s = Scratch::new();
    let src = s.path("src.raw");
    // 48 MiB: text (compresses), noise (does not), zeros between.
    for i in 0..12u64 {
        let data = if i % 2 == 0 {
            text(i, 2 << 20)
        } else {
            noise(i, 2 << 20)
        };
        write_at(&src, i * (4 << 20), &data);
    }
    let dst = s.path("dst.qcow2");
    let mut interrupted = 0;
    for args in [&[][..], &["-c"][..], &["-m", "1"][..]] {
        // How long a whole conversion takes, to kill inside it.
        let whole = {
            let t = Instant::now();
            let out = run(&src, &dst, args).wait_with_output().unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            t.elapsed()
        };
        for step in 1..=6u32 {
            let _ = std::fs::remove_file(&dst);
            let mut child = run(&src, &dst, args);
            std::thread::sleep(whole * step / 7);
            let killed = child.kill().is_ok();
            let status = child.wait().unwrap();
            if !killed || status.success() || !dst.exists() {
                // It finished (or had not made the file) before the kill.
                continue;
            }
            interrupted += 1;
            let check = qemu_img(["check", dst.to_str().unwrap()]);
            assert!(
                matches!(check.code, Some(0) | Some(3)),
                "{args:?}, killed at {}/7 of the run: {}",
                step,
                check.describe()
            );
        }
    }
    assert!(
        interrupted >= 6,
        "only {interrupted} conversions were interrupted mid-way"
    );
}

fn run(src: &std::path::Path, dst: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(qcow2_bin())
        .arg("convert")
        .args(["-f", "raw", "-O", "qcow2"])
        .args(args)
        .arg(src)
        .arg(dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
