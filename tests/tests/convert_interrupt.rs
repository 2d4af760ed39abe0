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
            let started = std::fs::read(&dst).is_ok_and(|b| b.starts_with(b"QFI\xfb"));
            if !killed || status.success() || !started {
                // It finished, or had not written the new image's header yet, before the kill.
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

/// A target that cannot grow (the file size limit, as a full disk would stop it): the conversion stops with
/// qemu-img's message and exit code, and a qcow2 target is left clean.
#[test]
fn write_failures_stop_with_qemu_img_message() {
    let s = Scratch::new();
    let src = s.path("src.raw");
    write_at(&src, 0, &noise(9, 8 << 20));
    for fmt in ["raw", "qcow2"] {
        let mut lines = Vec::new();
        let tools = [
            (qcow2_bin().as_os_str().to_owned(), "ours"),
            ("qemu-img".into(), "qemu"),
        ];
        for (tool, name) in tools {
            let dst = s.path(&format!("{name}.{fmt}"));
            // 2 MiB at most per file; SIGXFSZ ignored, so the write fails with EFBIG.
            let mut cmd = Command::new("bash");
            // qemu-img as the harness runs it (QCOW2_QEMU_DIR first on PATH).
            qcow2_tests::qemu_env(&mut cmd);
            let out = cmd
                .arg("-c")
                .arg("trap '' XFSZ; ulimit -f 4096; exec \"$@\"")
                .arg("limited")
                .arg(&tool)
                .args(["convert", "-f", "raw", "-O", fmt])
                .arg(&src)
                .arg(&dst)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{name} -O {fmt}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let line = err.lines().next().unwrap_or("").to_string();
            let file = dst.to_str().unwrap();
            lines.push(
                line.split_once(": ")
                    .map_or(line.clone(), |(_, m)| m.replace(file, "DST")),
            );
            if fmt == "qcow2" {
                let check = qemu_img(["check", file]);
                assert_eq!(check.code, Some(0), "{name}: {}", check.describe());
            }
        }
        assert_eq!(lines[0], lines[1], "-O {fmt}");
    }
}
