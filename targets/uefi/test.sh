#!/usr/bin/env bash
# Boots a qcow2 disk in OVMF through targets/uefi's qcow2-boot: once read-only, once an internal snapshot
# read-only, then read-write (a rollback to a snapshot among the runs, and power cuts during rollbacks).
#
# The disk: GPT, one EFI system partition (FAT) holding \EFI\BOOT\ (empty) in the base image and
# \EFI\BOOT\BOOTX64.EFI (the payload) in the overlay only. The base is converted to a deflate-compressed
# qcow2 (base.qcow2); the overlay (overlay.qcow2, backing file base.qcow2) holds only the clusters that
# differ. Both are attached to QEMU as raw virtio disks (format=raw: QEMU does not interpret them), so only
# qcow2-core understands qcow2. qcow2-boot.efi is started by OVMF from a small read-only FAT drive (QEMU's
# vvfat) as \EFI\BOOT\BOOTX64.EFI.
#
# Read-only run (qcow2-boot's default; both disks attached read-only): passes when the payload's line
# appears on the serial output within the time limit (QCOW2_UEFI_TIMEOUT seconds per run, 180 by default).
# In every run, before its line, the payload calls ReadBlocks of the whole virtual disk (qcow2-boot's Block
# I/O, not the partition's) with requests the UEFI spec says must fail (a wrong media id, also with 0 bytes
# and with a bad size past the end: MEDIA_CHANGED; 520 bytes: BAD_BUFFER_SIZE; after the last block, 2
# blocks from the last, block 2^64-1: INVALID_PARAMETER) or do nothing (0 bytes: SUCCESS), and prints each
# status; on the read-only disk WriteBlocks of a valid request must say WRITE_PROTECTED.
#
# Read-write runs: qcow2-boot.cfg next to qcow2-boot.efi says mode=rw; each run has a fresh overlay (with
# 8 MiB of room after its data: a firmware disk cannot grow) attached writable, the base stays read-only.
# The payload writes \qcow2-rw.txt (5000 lines, 320000 bytes) into the FAT file system through the
# firmware, flushes and closes it, writes the file's first 4 KiB into the last 8 blocks of the ESP through
# Block I/O with no FlushBlocks after (qcow2-boot reports no write caching: the write must be durable when
# it returns), makes the same bad requests to WriteBlocks (at the GPT header or past the end), prints its
# line, and leaves as \payload.cfg on the overlay says:
#   reset       ResetSystem(shutdown): qcow2-boot's reset notification closes the image (lazy refcounts)
#   exitbs      ExitBootServices, then ResetSystem: the before-ExitBootServices event closes it (lazy refcounts)
#   return      returns: qcow2-boot removes the virtual disk and closes the image (lazy refcounts)
#   cut         hangs, and QEMU is killed (SIGKILL) as soon as the line shows: nothing closes the image or
#               flushes; the data and the metadata must already be on the disk (qcow2-boot writes through)
#   shell       as reset, with mode=rw in the load options (the UEFI shell starts qcow2-boot)
# After each: every bad request got its status, `qemu-img check` of the overlay exits 0 with no leak and no
# corruption, qemu-img info says it is not dirty, the base is byte for byte what it was, and in `qemu-img
# convert -O raw` of the overlay the disk outside the ESP is byte for byte as made, the ESP passes
# `fsck.fat -n` and holds the payload and \qcow2-rw.txt with exactly the payload's content, and the ESP's
# last 8 blocks hold the 4 KiB written through Block I/O.
# Then a read-write run with no room after the overlay (see "full" below), the encrypted disks and a
# settings file with a mistake. Encrypted (LUKS, made by qemu-img): enc-ro boots an encrypted overlay of the
# unencrypted compressed base read-only, the passphrase from the settings; enc-ask boots a standalone
# encrypted image, the passphrase typed on the serial console (a wrong one first: asked again; nothing
# echoed); enc-refused types three wrong ones (qcow2-boot fails cleanly, the image unchanged); enc-rw is a
# read-write run on an encrypted overlay with every check of one, qemu-img and qemu-io opening the overlay
# with the passphrase.
# Fails (never skips) when a tool is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
LINE="qcow2-payload: booted from inside the qcow2 image"
limit=${QCOW2_UEFI_TIMEOUT:-180}

for tool in qemu-system-x86_64 qemu-img sgdisk mkfs.fat fsck.fat mmd mcopy cmp seq; do
    command -v "$tool" >/dev/null || { echo "uefi test: $tool is missing" >&2; exit 1; }
done
code=
for c in /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_CODE.fd; do
    [[ -e $c ]] && { code=$c; break; }
done
[[ -n $code ]] || { echo "uefi test: OVMF is missing (/usr/share/OVMF)" >&2; exit 1; }
vars=${code/CODE/VARS}

cargo build --release
out=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
out=$out/x86_64-unknown-uefi/release

work=$(mktemp -d)
[[ -n ${QCOW2_UEFI_KEEP:-} ]] || trap 'rm -rf "$work"' EXIT; echo "work: $work"
cd "$work"

# The ESP: 32 MiB FAT at LBA 2048 of a 40 MiB GPT disk.
esp_start=2048
esp_sectors=$((32 * 2048))
mkfs.fat -C -F 16 -n QCOW2ESP esp-base.img $((esp_sectors / 2)) >/dev/null
mmd -i esp-base.img ::/EFI ::/EFI/BOOT
cp esp-base.img esp-top.img
mcopy -i esp-top.img "$out/payload.efi" ::/EFI/BOOT/BOOTX64.EFI
# make_disk NAME ESP: disk-NAME.raw, a GPT disk whose partition 1 is the FAT image ESP.
make_disk() {
    truncate -s 40M "disk-$1.raw"
    sgdisk -o -n 1:$esp_start:+$esp_sectors -t 1:ef00 -c 1:ESP -U 11111111-2222-3333-4444-555555555555 \
        -u 1:66666666-7777-8888-9999-000000000000 "disk-$1.raw" >/dev/null
    [[ $(dd if="disk-$1.raw" bs=1 skip=512 count=8 status=none) == "EFI PART" ]] || { echo "no GPT made" >&2; exit 1; }
    dd if="$2" of="disk-$1.raw" bs=512 seek=$esp_start conv=notrunc status=none
}
make_disk base esp-base.img
make_disk top esp-top.img
qemu-img convert -c -O qcow2 disk-base.raw base.qcow2
qemu-img convert -O qcow2 -B base.qcow2 -F qcow2 disk-top.raw overlay.qcow2
qemu-img convert -O raw overlay.qcow2 check.raw && cmp check.raw disk-top.raw && rm check.raw
# Whole sectors, so the raw view of each file is all of it.
truncate -s %512 base.qcow2 overlay.qcow2
ls -l base.qcow2 overlay.qcow2

mkdir -p boot/EFI/BOOT
cp "$out/qcow2-boot.efi" boot/EFI/BOOT/BOOTX64.EFI

# boot NAME BOOT_DIR OVERLAY OVERLAY_READONLY(on|off) STOP SIGNAL [DELAY]: runs QEMU (serial output in
# serial-NAME.txt) until it ends by itself, the fixed string STOP shows (empty: never; QEMU is then sent
# SIGNAL: TERM a second later, or KILL after DELAY seconds, 0 by default), qcow2-boot reports a failure,
# or time runs out. Sets rc to QEMU's exit status and prints what was printed about booting.
boot() {
    local name=$1 dir=$2 overlay=$3 ro=$4 stop=$5 signal=$6 delay=${7:-0} serial=serial-$1.txt
    cp "$vars" vars.fd
    qemu-system-x86_64 -machine q35 -m 256 -nographic -no-reboot -net none \
        -drive if=pflash,format=raw,readonly=on,file="$code" -drive if=pflash,format=raw,file=vars.fd \
        -drive if=virtio,format=raw,readonly=on,file=fat:"$dir" \
        -drive if=virtio,format=raw,readonly="$ro",file="$overlay" \
        -drive if=virtio,format=raw,readonly=on,file=base.qcow2 \
        -serial mon:stdio </dev/null >"$serial" 2>&1 &
    local qemu=$! start=$SECONDS
    while kill -0 "$qemu" 2>/dev/null && ((SECONDS - start < limit)); do
        [[ -n $stop ]] && grep -aqF -e "$stop" "$serial" 2>/dev/null && break
        grep -aq "qcow2-boot: failed" "$serial" 2>/dev/null && break
        sleep 0.2
    done
    if kill -0 "$qemu" 2>/dev/null; then
        if [[ $signal == TERM ]]; then
            sleep 1
            kill "$qemu" 2>/dev/null || true
        else
            sleep "$delay"
            kill -KILL "$qemu" 2>/dev/null || true
        fi
    fi
    rc=0
    wait "$qemu" 2>/dev/null || rc=$?
    echo "(qemu-system-x86_64 ran $((SECONDS - start))s); what it printed about booting:"
    tr -d '\r' <"$serial" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -a -E 'qcow2|BdsDxe' | head -40 || true
}

# Fails with the serial output's tail.
fail() {
    echo "FAIL ($1): $2" >&2
    tail -c 3000 "serial-$1.txt" | tr -d '\r' >&2
    exit 1
}

# Whether the serial output of run NAME has the line LINE.
printed() {
    tr -d '\r' <"serial-$1.txt" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -aqxF -e "$2"
}

# The payload's lines for its requests to the whole virtual disk's CALL (ReadBlocks or WriteBlocks) that
# the UEFI spec says must be refused (or, for 0 bytes, do nothing): in the array probes.
probe_lines() {
    probes=("qcow2-payload: $1 with a wrong media id: MEDIA_CHANGED"
        "qcow2-payload: $1 with a wrong media id and 0 bytes: MEDIA_CHANGED"
        "qcow2-payload: $1 with a wrong media id, of 520 bytes after the last block: MEDIA_CHANGED"
        "qcow2-payload: $1 of 520 bytes: BAD_BUFFER_SIZE"
        "qcow2-payload: $1 at the block after the last: INVALID_PARAMETER"
        "qcow2-payload: $1 of 2 blocks at the last block: INVALID_PARAMETER"
        "qcow2-payload: $1 at block 2^64-1: INVALID_PARAMETER"
        "qcow2-payload: $1 of 0 bytes: SUCCESS")
}
probe_lines ReadBlocks
read_probes=("${probes[@]}")
probe_lines WriteBlocks
write_probes=("${probes[@]}")

echo
echo "=== read-only (the default)"
boot ro boot overlay.qcow2 on "$LINE" TERM
if tr -d '\r' <serial-ro.txt | grep -aq "$LINE"; then
    echo "uefi: the payload ran from inside the qcow2 disk (qemu exit status $rc)"
else
    fail ro "no '$LINE' on the serial output within ${limit}s (qemu exit status $rc)"
fi
for l in "${read_probes[@]}" "qcow2-payload: WriteBlocks on a read-only disk: WRITE_PROTECTED"; do
    printed ro "$l" || fail ro "no line '$l'"
done
echo "uefi: ro: ReadBlocks refused each bad request as the UEFI spec says, WriteBlocks said WRITE_PROTECTED"

# break_update NAME: a "failed update" of NAME.qcow2: the ESP's first MiB (boot sector and FATs) zeroed, so
# that its active disk has no file system left to boot from.
break_update() {
    qemu-io -f qcow2 -c "write -z $((esp_start * 512)) 1M" "$1.qcow2" >/dev/null
}

# snapshot=NAME (read-only): the overlay's active disk cannot boot (its ESP is zeroed), its snapshot "good"
# can; qcow2-boot boots the snapshot and the overlay stays as it was.
echo
echo "=== read-only, snapshot=good: booting an internal snapshot of a disk whose active state cannot boot"
cp overlay.qcow2 snap.qcow2
qemu-img snapshot -c good snap.qcow2
break_update snap
truncate -s %512 snap.qcow2
cp snap.qcow2 snap.orig
mkdir -p boot-snap/EFI/BOOT
cp "$out/qcow2-boot.efi" boot-snap/EFI/BOOT/BOOTX64.EFI
printf 'snapshot=good\n' >boot-snap/EFI/BOOT/qcow2-boot.cfg
boot snap boot-snap snap.qcow2 on "$LINE" TERM
for l in "qcow2-boot: booting snapshot good (read-only)" "$LINE"; do
    printed snap "$l" || fail snap "no line '$l'"
done
cmp snap.qcow2 snap.orig || fail snap "the overlay changed"
echo "uefi: snap: the snapshot of a disk whose active state has no file system booted read-only (qemu exit status $rc)"

# The read-write runs.
mkdir -p boot-rw/EFI/BOOT
cp "$out/qcow2-boot.efi" boot-rw/EFI/BOOT/BOOTX64.EFI
printf '# qcow2-boot settings\nmode=rw\n' >boot-rw/EFI/BOOT/qcow2-boot.cfg
cp base.qcow2 base.orig
seq -f 'qcow2-payload wrote line %06g of a file on the qcow2 overlay.' 0 4999 >expected.txt
[[ $(stat -c %s expected.txt) == 320000 ]] || { echo "expected.txt is not 320000 bytes" >&2; exit 1; }

# The passphrase of the encrypted disks. With ENC set, new_overlay makes LUKS-encrypted overlays and the
# checks open them with it (img).
PASS=correct-horse
SECRET="secret,id=s0,data=$PASS"
LUKS="encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
# img FILE: how qemu-img and qemu-io name FILE (with the secret when ENC is set).
img() {
    if [[ -n ${ENC:-} ]]; then
        echo "--object $SECRET --image-opts driver=qcow2,file.filename=$1,encrypt.key-secret=s0"
    else
        echo "$1"
    fi
}

# new_overlay NAME ESP [LAZY]: NAME.qcow2, an overlay of base.qcow2 for a GPT disk around the FAT image
# ESP (lazy_refcounts=LAZY, off by default; LUKS-encrypted when ENC is set), with 8 MiB of room after it.
new_overlay() {
    make_disk "$1" "$2"
    qemu-img convert -O qcow2 ${ENC:+--object "$SECRET"} -o lazy_refcounts="${3:-off}"${ENC:+,$LUKS} \
        -B base.qcow2 -F qcow2 "disk-$1.raw" "$1.qcow2"
    truncate -s %512 "$1.qcow2"
    truncate -s +8M "$1.qcow2"
    rm "disk-$1.raw"
}

# clean NAME: the overlay NAME.qcow2 is clean (qemu-img check exits 0, no leak, no corruption) and not
# dirty; the base is byte for byte what it was.
clean() {
    local check st=0
    # shellcheck disable=SC2046 # img's words
    check=$(qemu-img check $(img "$1.qcow2") 2>&1) || st=$?
    echo "$check" | sed 's/^/  qemu-img check: /'
    ((st == 0)) || fail "$1" "qemu-img check exit status $st"
    grep -q "^No errors were found on the image.$" <<<"$check" || fail "$1" "qemu-img check found errors"
    ! grep -qi -e leak -e corrupt <<<"$check" || fail "$1" "qemu-img check found leaks or corruptions"
    # (The top-level key: the protocol layer under "children" has one too.)
    qemu-img info --output=json "$1.qcow2" | grep -qx '    "dirty-flag": false' ||
        fail "$1" "the overlay is dirty (or qemu-img info has no top-level dirty-flag)"
    cmp base.qcow2 base.orig || fail "$1" "the base image changed"
}

# outside_esp_unchanged RAW: whether the raw disk RAW is, before and after the ESP, byte for byte the disk
# made above (the GPT and the zeros around it).
outside_esp_unchanged() {
    cmp -n $((esp_start * 512)) "$1" disk-top.raw && cmp -i $(((esp_start + esp_sectors) * 512)) "$1" disk-top.raw
}

# rw NAME BOOT_DIR EXIT LAZY STOP HOOK: a read-write run (see the top of this file). BOOT_DIR is what OVMF
# boots from; EXIT the payload's \payload.cfg (empty: none, the payload resets); LAZY the overlay's
# lazy_refcounts; STOP as for boot (empty: QEMU must power off by itself); HOOK the line of qcow2-boot that
# says how the image was closed (empty: none expected).
rw() {
    local name=$1 dir=$2 exit=$3 lazy=$4 stop=$5 hook=$6 settings=
    echo
    echo "=== read-write, $name: the payload writes a file and then: ${exit:-reset} (lazy_refcounts=$lazy)"
    cp esp-top.img "esp-$name.img"
    if [[ -n $exit ]]; then
        echo "$exit" >"payload-$name.cfg"
        mcopy -i "esp-$name.img" "payload-$name.cfg" ::/payload.cfg
    fi
    new_overlay "$name" "esp-$name.img" "$lazy"
    [[ -z ${PREPARE:-} ]] || "$PREPARE" "$name"
    if [[ -n $stop ]]; then
        boot "$name" "$dir" "$name.qcow2" off "$stop" KILL
        ((rc == 137)) || fail "$name" "QEMU ended before '$stop' (exit status $rc)"
    else
        boot "$name" "$dir" "$name.qcow2" off "" KILL
        ((rc == 0)) || fail "$name" "QEMU did not power off within ${limit}s (exit status $rc)"
    fi
    [[ $dir == boot-rw || $dir == boot-rollback || $dir == boot-enc-rw ]] &&
        settings="qcow2-boot: settings read from \\EFI\\BOOT\\qcow2-boot.cfg"
    for l in ${settings:+"$settings"} "qcow2-boot: read-write" \
        "qcow2-payload: wrote \\qcow2-rw.txt (320000 bytes), flushed and closed it" \
        "qcow2-payload: wrote 4096 bytes at block $((esp_sectors - 8)) of its partition through Block I/O, no flush" \
        "${read_probes[@]}" "${write_probes[@]}" "$LINE" ${hook:+"$hook"}; do
        printed "$name" "$l" || fail "$name" "no line '$l'"
    done
    if grep -aq -e "qcow2-boot: failed" -e "qcow2-boot: writing" -e "closing the image failed" "serial-$name.txt"; then
        fail "$name" "qcow2-boot reported an error"
    fi

    clean "$name"
    # The guest disk: outside the ESP (where the refused writes aimed) as made; the file system is sound and
    # holds the payload and the file written.
    # shellcheck disable=SC2046 # img's words
    qemu-img convert -O raw $(img "$name.qcow2") "$name.raw"
    outside_esp_unchanged "$name.raw" || fail "$name" "the disk outside the ESP changed"
    dd if="$name.raw" of="esp-$name.out" bs=512 skip=$esp_start count=$esp_sectors status=none
    fsck.fat -n "esp-$name.out" >"fsck-$name.txt" 2>&1 || { cat "fsck-$name.txt" >&2; fail "$name" "fsck.fat -n failed"; }
    mcopy -n -i "esp-$name.out" ::/qcow2-rw.txt "got-$name.txt"
    cmp "got-$name.txt" expected.txt || fail "$name" "\\qcow2-rw.txt differs from what the payload wrote"
    mcopy -n -i "esp-$name.out" ::/EFI/BOOT/BOOTX64.EFI "payload-$name.efi"
    cmp "payload-$name.efi" "$out/payload.efi" || fail "$name" "\\EFI\\BOOT\\BOOTX64.EFI changed"
    cmp <(dd if="esp-$name.out" bs=512 skip=$((esp_sectors - 8)) status=none) <(head -c 4096 expected.txt) ||
        fail "$name" "the ESP's last 8 blocks do not hold what the payload wrote through Block I/O"
    echo "uefi: $name: the overlay is clean and not dirty, the base unchanged, \\qcow2-rw.txt (320000 bytes)" \
        "and the 4 KiB written through Block I/O read back exactly, fsck.fat is content, the bad ReadBlocks" \
        "and WriteBlocks requests were refused as the UEFI spec says and left the disk as it was (qemu exit status $rc)"
    rm -f "$name.raw" "esp-$name.img" "esp-$name.out"
}

rw reset boot-rw reset on "" "qcow2-boot: ResetSystem: the image is flushed and closed"
rw exitbs boot-rw exit-boot-services on "" "qcow2-boot: ExitBootServices: the image is flushed and closed"
rw return boot-rw return on "qcow2-boot: the virtual disk is removed" \
    "qcow2-boot: the program returned: the image is flushed and closed"
rw cut boot-rw hang off "$LINE" ""

# mode=rw in the load options instead of the file: qcow2-boot.efi started by the UEFI shell's startup.nsh
# (OVMF boots the shell when the drive has no \EFI\BOOT\BOOTX64.EFI); the payload has no \payload.cfg.
mkdir -p boot-shell
cp "$out/qcow2-boot.efi" boot-shell/qcow2-boot.efi
printf 'fs0:\r\nqcow2-boot.efi mode=rw\r\n' >boot-shell/startup.nsh
rw shell boot-shell "" on "" "qcow2-boot: ResetSystem: the image is flushed and closed"

# rollback=good (A/B rollback): the overlay's snapshot "good" is the bootable disk, its active state a
# failed update (the ESP zeroed). qcow2-boot applies the snapshot, then boots it read-write: every check of
# a read-write run holds, and the snapshot is still there.
mkdir -p boot-rollback/EFI/BOOT
cp "$out/qcow2-boot.efi" boot-rollback/EFI/BOOT/BOOTX64.EFI
printf 'mode=rw\nrollback=good\n' >boot-rollback/EFI/BOOT/qcow2-boot.cfg
# snapshot_and_break NAME: snapshot "good" of NAME.qcow2, then a failed update of its active disk.
snapshot_and_break() {
    qemu-img snapshot -c good "$1.qcow2"
    break_update "$1"
    # Room after the data again (the snapshot table went to the end of the file).
    truncate -s %512 "$1.qcow2"
    truncate -s +8M "$1.qcow2"
}
PREPARE=snapshot_and_break rw rollback boot-rollback "" on "" "qcow2-boot: rolled back to snapshot good"
qemu-img snapshot -l rollback.qcow2 | grep -q " good " || fail rollback "the snapshot is gone"

# Power cut during the rollback: QEMU is killed at a random moment (up to 0.4 s) after qcow2-boot says it
# rolls back, three times. The next boot (mode=rw, no rollback: its writable open repairs a dirty image)
# sees the old disk (no file system: qcow2-boot fails) or the rolled-back one (the payload runs); either
# way the overlay is then clean and not dirty, the base unchanged, the snapshot there.
for i in 1 2 3; do
    name=cut-rollback-$i
    echo
    echo "=== read-write, $name: power cut during the rollback"
    new_overlay "$name" esp-top.img on
    snapshot_and_break "$name"
    delay=$(printf '0.%03d' $((RANDOM % 400)))
    boot "$name" boot-rollback "$name.qcow2" off "qcow2-boot: rolling back to snapshot good" KILL "$delay"
    if printed "$name" "qcow2-boot: rolled back to snapshot good"; then
        when="after qcow2-boot said it had rolled back"
    else
        when="before qcow2-boot could say it had rolled back"
    fi
    boot "$name-next" boot-rw "$name.qcow2" off "" TERM
    if printed "$name-next" "$LINE"; then
        seen="the rolled-back disk (the payload ran)"
    elif printed "$name-next" "qcow2-boot: no file system on the virtual disk (1 in all)" ||
        grep -aq "qcow2-boot: no file system on the virtual disk" "serial-$name-next.txt"; then
        seen="the old disk (no file system)"
    else
        fail "$name-next" "neither the old nor the rolled-back disk"
    fi
    clean "$name"
    qemu-img snapshot -l "$name.qcow2" | grep -q " good " || fail "$name" "the snapshot is gone"
    echo "uefi: $name: killed $delay s after the rollback began, $when; the next boot saw $seen;" \
        "the overlay is clean and not dirty"
done

# No room after the overlay (the disk that holds it cannot grow): after the bad requests the payload writes
# a block where the overlay has no cluster (\payload.cfg says disk-full; it writes nothing else). The
# firmware disk refuses the new cluster past its end, so qcow2-boot must fail that WriteBlocks with
# DEVICE_ERROR and go on serving the disk (the block still reads as zeros), then close the image on
# ResetSystem; the overlay must be clean and not dirty and the virtual disk unchanged. qcow2-core gives back
# the cluster it allocated for the failed write: qemu-img check looks only at clusters inside the file, so
# the overlay is checked once more grown by a few clusters, where a refcount left on the new cluster (past
# the old end) would show as a leak.
echo
echo "=== read-write, full: no room after the overlay for a new cluster"
cp esp-top.img esp-full.img
echo disk-full >payload-full.cfg
mcopy -i esp-full.img payload-full.cfg ::/payload.cfg
make_disk full esp-full.img
qemu-img convert -O qcow2 -o lazy_refcounts=off -B base.qcow2 -F qcow2 disk-full.raw full.qcow2
truncate -s %512 full.qcow2
boot full boot-rw full.qcow2 off "" KILL
((rc == 0)) || fail full "QEMU did not power off within ${limit}s (exit status $rc)"
for l in "qcow2-boot: read-write" "${read_probes[@]}" "${write_probes[@]}" \
    "qcow2-boot: writing 512 bytes at block 1000: Io(INVALID_PARAMETER)" \
    "qcow2-payload: WriteBlocks at block 1000, a new cluster on a full disk: DEVICE_ERROR" \
    "qcow2-payload: ReadBlocks at block 1000 after it: SUCCESS, zeros" \
    "$LINE" "qcow2-boot: ResetSystem: the image is flushed and closed"; do
    printed full "$l" || fail full "no line '$l'"
done
! grep -aq -e "qcow2-boot: failed" -e "closing the image failed" serial-full.txt || fail full "qcow2-boot failed"
clean full
cp full.qcow2 full-grown.qcow2
truncate -s +256K full-grown.qcow2
grown=$(qemu-img check full-grown.qcow2 2>&1) || fail full "qemu-img check of the grown overlay: $grown"
! grep -qi -e leak -e corrupt <<<"$grown" || fail full "the failed write left a refcount behind: $grown"
rm -f full-grown.qcow2
qemu-img convert -O raw full.qcow2 full.raw
cmp full.raw disk-full.raw || fail full "the virtual disk changed"
echo "uefi: full: the write that needed a new cluster failed with DEVICE_ERROR, the overlay is clean and" \
    "not dirty (also grown by 256 KiB: the cluster went back), the base and the virtual disk unchanged" \
    "(qemu exit status $rc)"
rm -f full.raw disk-full.raw esp-full.img

# Encrypted disks (LUKS, made by qemu-img with passphrase $PASS).
# enc-ro: an encrypted overlay of the unencrypted compressed base, the passphrase in qcow2-boot.cfg:
# read-only boot.
echo
echo "=== encrypted, enc-ro: a LUKS overlay of the compressed base, passphrase from the settings"
mkdir -p boot-enc-ro/EFI/BOOT boot-enc-rw/EFI/BOOT boot-enc-ask/EFI/BOOT
cp "$out/qcow2-boot.efi" boot-enc-ro/EFI/BOOT/BOOTX64.EFI
cp "$out/qcow2-boot.efi" boot-enc-rw/EFI/BOOT/BOOTX64.EFI
cp "$out/qcow2-boot.efi" boot-enc-ask/EFI/BOOT/BOOTX64.EFI
printf 'passphrase=%s\n' "$PASS" >boot-enc-ro/EFI/BOOT/qcow2-boot.cfg
printf 'mode=rw\npassphrase=%s\n' "$PASS" >boot-enc-rw/EFI/BOOT/qcow2-boot.cfg
make_disk enc esp-top.img
qemu-img convert -O qcow2 --object "$SECRET" -o "$LUKS" -B base.qcow2 -F qcow2 disk-enc.raw enc-ro.qcow2
qemu-img convert -O qcow2 --object "$SECRET" -o "$LUKS" disk-enc.raw enc-alone.qcow2
truncate -s %512 enc-ro.qcow2 enc-alone.qcow2
qemu-img info enc-ro.qcow2 | grep -qx "encrypted: yes" || fail enc-ro "qemu-img did not encrypt the overlay"
boot enc-ro boot-enc-ro enc-ro.qcow2 on "$LINE" TERM
printed enc-ro "$LINE" || fail enc-ro "no line '$LINE'"
echo "uefi: enc-ro: the payload ran from inside the encrypted overlay (qemu exit status $rc)"

# boot_typing NAME BOOT_DIR IMAGE ANSWER...: boots IMAGE alone (read-only), typing the next ANSWER (and
# Enter) on the serial console each time qcow2-boot asks for the passphrase, until the payload's line,
# a failure, or the time limit.
boot_typing() {
    local name=$1 dir=$2 image=$3 serial=serial-$1.txt asked=0
    shift 3
    cp "$vars" vars.fd
    rm -f "in-$name"
    mkfifo "in-$name"
    qemu-system-x86_64 -machine q35 -m 256 -nographic -no-reboot -net none \
        -drive if=pflash,format=raw,readonly=on,file="$code" -drive if=pflash,format=raw,file=vars.fd \
        -drive if=virtio,format=raw,readonly=on,file=fat:"$dir" \
        -drive if=virtio,format=raw,readonly=on,file="$image" \
        -serial mon:stdio <"in-$name" >"$serial" 2>&1 &
    local qemu=$! start=$SECONDS
    exec 7>"in-$name"
    while kill -0 "$qemu" 2>/dev/null && ((SECONDS - start < limit)); do
        grep -aqF -e "$LINE" "$serial" 2>/dev/null && break
        grep -aq "qcow2-boot: failed" "$serial" 2>/dev/null && break
        local n
        n=$(grep -ac "qcow2-boot: passphrase:" "$serial" 2>/dev/null || true)
        if ((n > asked)) && (($# > 0)); then
            sleep 1
            printf '%s\r' "$1" >&7
            shift
            asked=$n
        fi
        sleep 0.2
    done
    sleep 1
    kill "$qemu" 2>/dev/null || true
    rc=0
    wait "$qemu" 2>/dev/null || rc=$?
    exec 7>&-
    echo "(qemu-system-x86_64 ran $((SECONDS - start))s); what it printed about booting:"
    tr -d '\r' <"$serial" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -a -E 'qcow2|BdsDxe' | head -40 || true
}

# enc-ask: the standalone encrypted image, no passphrase in the settings: qcow2-boot asks at the console;
# a wrong one is asked again, the right one unlocks the disk and the payload runs.
echo
echo "=== encrypted, enc-ask: a standalone LUKS image, the passphrase typed (a wrong one first)"
cp enc-alone.qcow2 enc-alone.orig
boot_typing enc-ask boot-enc-ask enc-alone.qcow2 battery-staple "$PASS"
for l in "qcow2-boot: the disk is encrypted" "qcow2-boot: the passphrase does not unlock the disk" \
    "qcow2-boot: the disk is unlocked" "$LINE"; do
    printed enc-ask "$l" || fail enc-ask "no line '$l'"
done
! grep -aq -e battery-staple -e "$PASS" serial-enc-ask.txt || fail enc-ask "a typed passphrase was echoed"
cmp enc-alone.qcow2 enc-alone.orig || fail enc-ask "the image changed"
echo "uefi: enc-ask: asked twice (the wrong passphrase refused, not echoed), the payload ran (qemu exit status $rc)"

# enc-refused: three wrong passphrases: qcow2-boot gives up cleanly and leaves the image alone.
echo
echo "=== encrypted, enc-refused: three wrong passphrases"
boot_typing enc-refused boot-enc-ask enc-alone.qcow2 one two three
for l in "qcow2-boot: no passphrase unlocked the disk" "qcow2-boot: failed: ACCESS_DENIED"; do
    printed enc-refused "$l" || fail enc-refused "no line '$l'"
done
! grep -aq "qcow2-payload" serial-enc-refused.txt || fail enc-refused "the payload ran"
cmp enc-alone.qcow2 enc-alone.orig || fail enc-refused "the image changed"
echo "uefi: enc-refused: three wrong passphrases, qcow2-boot failed cleanly, the image unchanged"

# enc-rw: a read-write run on a LUKS overlay (passphrase from the settings): every check of a read-write
# run, with qemu-img opening the overlay with the passphrase (check, and the raw copy the file is read
# from); and qemu-io reads the payload's file where it lies on the guest disk.
ENC=1 rw enc-rw boot-enc-rw reset on "" "qcow2-boot: ResetSystem: the image is flushed and closed"
# shellcheck disable=SC2046 # img's words
qemu-io $(ENC=1 img enc-rw.qcow2) -r -c "read 0 40M" | grep -q "^read 41943040/41943040 bytes" ||
    fail enc-rw "qemu-io could not read the encrypted overlay with the passphrase"
echo "uefi: enc-rw: qemu-io reads the whole encrypted overlay with the passphrase"
rm -f disk-enc.raw

# A settings file with a mistake: qcow2-boot refuses to start (it does not fall back to read-only), and
# the writable overlay is left as it was.
echo
echo "=== a settings file with a mistake"
mkdir -p boot-bad/EFI/BOOT
cp "$out/qcow2-boot.efi" boot-bad/EFI/BOOT/BOOTX64.EFI
echo "mode=wr" >boot-bad/EFI/BOOT/qcow2-boot.cfg
new_overlay bad esp-top.img
cp bad.qcow2 bad.orig
boot bad boot-bad bad.qcow2 off "qcow2-boot: failed" KILL
for l in "qcow2-boot: \\EFI\\BOOT\\qcow2-boot.cfg: mode must be ro or rw" "qcow2-boot: failed: INVALID_PARAMETER"; do
    printed bad "$l" || fail bad "no line '$l'"
done
! grep -aq "qcow2-payload" serial-bad.txt || fail bad "the payload ran"
cmp bad.qcow2 bad.orig || fail bad "the overlay changed"
echo "uefi: bad: qcow2-boot refused the settings file and left the overlay alone"

echo
echo "uefi: all runs passed"
