//! `qcow2 convert -n --target-image-opts` against qemu-img: the target named by an option string (`driver=`
//! given or probed, `file.filename=`), the copy byte-identical; the mistakes (no `-n`, with `-O`, a plain
//! file name) with qemu-img's messages and exit codes.

use qcow2_tests::{Scratch, assert_files_equal, qcow2, qemu_img, qemu_img_ok, qemu_io_cmds};

#[test]
fn target_option_strings_match_qemu_img() {
    let s = Scratch::new();
    let src = s.qcow2("src.qcow2", "", 1 << 20);
    qemu_io_cmds(&src, "qcow2", &["write -P 5 0 300k".to_string()]);
    let src = src.to_str().unwrap().to_string();
    for (fmt, target) in [
        ("qcow2", "driver=qcow2,file.filename=DST"),
        ("qcow2", "file.filename=DST"),
        ("raw", "driver=raw,file.filename=DST,file.driver=file"),
        ("raw", "file.filename=DST"),
    ] {
        for extra in [&["-n"][..], &[][..], &["-n", "-O", "qcow2"][..]] {
            let (ours, theirs) = (s.path("ours.img"), s.path("theirs.img"));
            for p in [&ours, &theirs] {
                qemu_img_ok(["create", "-q", "-f", fmt, p.to_str().unwrap(), "1M"]);
            }
            let run = |dst: &std::path::Path, tool: fn(&[&str]) -> qcow2_tests::Output| {
                let t = target.replace("DST", dst.to_str().unwrap());
                let mut args = vec!["convert", "--target-image-opts"];
                args.extend_from_slice(extra);
                args.extend([src.as_str(), t.as_str()]);
                tool(&args)
            };
            let (o, t) = (run(&ours, |a| qcow2(a)), run(&theirs, |a| qemu_img(a)));
            let what = format!("{target} {extra:?}");
            assert_eq!(
                o.code,
                t.code,
                "{what}:\n{}\n{}",
                o.describe(),
                t.describe()
            );
            assert_eq!(
                o.stderr_as_ours().replace(ours.to_str().unwrap(), "X"),
                t.stderr_as_ours().replace(theirs.to_str().unwrap(), "X"),
                "{what}: messages"
            );
            assert_files_equal(&ours, &theirs, &what);
        }
    }
    // A plain file name is not an option string.
    let dst = s.qcow2("plain.qcow2", "", 1 << 20);
    let args = [
        "convert",
        "-n",
        "--target-image-opts",
        &src,
        dst.to_str().unwrap(),
    ];
    let (o, t) = (qcow2(args), qemu_img(args));
    assert_eq!((o.code, o.stderr_as_ours()), (t.code, t.stderr_as_ours()));
}
