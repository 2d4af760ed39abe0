//! `qcow2 info` opens the image alone, as qemu-img does: an overlay whose backing file is missing (or
//! unreadable) is described as qemu-img describes it, in text and JSON; with `--backing-chain` both tools
//! fail.

use qcow2_tests::{Scratch, qcow2, qemu_img, qemu_img_ok};

#[test]
fn overlay_without_its_backing_file() {
    let s = Scratch::new();
    let base = s.qcow2("b.qcow2", "", 1 << 20);
    for (name, fmt) in [("t.qcow2", "qcow2"), ("r.qcow2", "raw")] {
        let img = s.path(name);
        qemu_img_ok([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            fmt,
            img.to_str().unwrap(),
            "1M",
        ]);
    }
    std::fs::remove_file(&base).unwrap();
    for name in ["t.qcow2", "r.qcow2"] {
        let img = s.path(name);
        let img = img.to_str().unwrap();
        for extra in [&[][..], &["--output=json"][..]] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(img);
            let (o, t) = (qcow2(&args), qemu_img(&args));
            assert_eq!(o.code, Some(0), "{args:?}: {}", o.describe());
            assert_eq!(t.code, Some(0), "{args:?}: {}", t.describe());
            assert_eq!(o.stdout_str(), t.stdout_str(), "{args:?}");
        }
        let args = ["info", "--backing-chain", img];
        let (o, t) = (qcow2(args), qemu_img(args));
        assert_eq!((o.code, t.code), (Some(1), Some(1)), "{args:?}");
    }
}
