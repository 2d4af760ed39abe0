#!/usr/bin/env bash
# Runs qcow2-virtio on qemu-system-aarch64's virt machine (Cortex-A53, bare metal) with images made by
# qemu-img attached as raw virtio-blk disks (only the program understands qcow2), one QEMU run per job, and
# checks what it prints and writes against QEMU's own tools:
# - `read` runs: the SHA-256 the program computes over each virtual disk must equal `sha256sum` of
#   `qemu-img convert -O raw` (plain, deflate-compressed with 4 KiB and 64 KiB clusters, extended L2, an
#   overlay whose backing file is a second, read-only disk that the program finds by the name the overlay
#   stores); the overlay is read once more through the legacy virtio-mmio interface;
# - `write` runs: the program writes (src/main.rs WRITES) into an overlay (copy-on-write from its read-only
#   backing disk) and an extended-L2 image, closes them and hashes them again in the same run; then
#   `qemu-img check` must find them clean, `qemu-io -c 'read -P ...'` must read every pattern back, and
#   `qemu-img compare` must find them equal to raw copies to which qemu-io made the same writes (whose
#   SHA-256 the program's second hash must also be). A disk cannot grow, so these images are padded first;
# - failures: a write into a read-only disk, an overlay without its backing disk and a write into an image
#   with no room, and a read and a write that the device fails (QEMU's blkdebug injects EIO; the device
#   answers VIRTIO_BLK_S_IOERR) must each end with an error line and exit status 1 (not a panic, an
#   exception or a hang), and the read-only disk must be left unchanged.
# Fails (never skips) when qemu-system-aarch64, qemu-img, qemu-io or sha256sum is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
targets=$(cd .. && pwd)

for tool in qemu-system-aarch64 qemu-img qemu-io sha256sum timeout; do
    command -v "$tool" >/dev/null || { echo "virtio test: $tool is missing" >&2; exit 1; }
done

cargo build --release
elf=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
elf=$elf/aarch64-unknown-none/release/qcow2-virtio

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The images (the same for targets/cortex-m and targets/virtio).
# shellcheck source=../guest-images.sh
source "$targets/guest-images.sh"
cp extl2.qcow2 write-full.qcow2

# The expected disks after the writes: raw copies with the same writes made by qemu-io.
size=$((8 * 1024 * 1024))
pattern_writes=("0xa5 $((65536 + 1000)) 5000" "0x3c $((3 * 1024 * 1024 + 7)) 70000" "0x5a $((size - 4096)) 4096")
writes=(write-overlay.qcow2 write-extl2.qcow2)
for f in "${writes[@]}"; do
    qemu-img convert -O raw "$f" "$f.expected"
    args=()
    for w in "${pattern_writes[@]}"; do
        read -r p o l <<<"$w"
        args+=(-c "write -P $p $o $l")
    done
    qemu-io -f raw "${args[@]}" "$f.expected" >/dev/null
    # Room for the new clusters: a virtio disk has the size of its file. Allocation takes the first free
    # clusters, so the writes land in the padding; qemu-img check does not mind unreferenced zeros.
    truncate -s $(($(stat -c %s "$f") + 4 * 1024 * 1024)) "$f"
done

fail=0
# run NAME LEGACY "JOB WORDS" DISK[:ro]...: one QEMU run; its output goes to NAME.out and to stdout, its
# exit status to $rc. Each disk's virtio serial is its file name. With $inject set to "EVENT [SECTOR]"
# (blkdebug's read_aio or write_aio), the first disk fails that I/O (at that sector) with EIO.
inject=
run() {
    local name=$1 legacy=$2 jobs=$3
    shift 3
    local semi=enable=on,target=native,arg=qcow2-virtio drives=() i=0 w d file opts event sector
    for w in $jobs; do semi+=",arg=$w"; done
    for d in "$@"; do
        file=${d%:ro}
        opts="file=$file"
        if [[ $i -eq 0 && -n $inject ]]; then
            read -r event sector <<<"$inject"
            opts="file.driver=blkdebug,file.image.filename=$file,file.inject-error.0.event=$event"
            opts+=",file.inject-error.0.errno=5"
            [[ -z $sector ]] || opts+=",file.inject-error.0.sector=$sector"
        fi
        [[ $d == *:ro ]] && opts+=,readonly=on
        drives+=(-drive "if=none,format=raw,id=d$i,$opts" -device "virtio-blk-device,drive=d$i,serial=$file")
        i=$((i + 1))
    done
    local start=$SECONDS
    set +e
    timeout 60 qemu-system-aarch64 -M virt -cpu cortex-a53 -m 128M -nographic -monitor none \
        -global "virtio-mmio.force-legacy=$legacy" -semihosting-config "$semi" -kernel "$elf" \
        "${drives[@]}" </dev/null >"$name.out" 2>&1
    rc=$?
    set -e
    echo "--- $jobs ($(if [[ $legacy == true ]]; then echo legacy; else echo modern; fi) virtio-mmio;" \
        "disks: $*; $((SECONDS - start))s, exit status $rc)"
    cat "$name.out"
}

# check_hash NAME OUT WANT: the line `sha256 NAME WANT` in OUT.
check_hash() {
    local got
    got=$(sed -n "s/^sha256 $1 //p" "$2")
    if [[ $got == "$3" ]]; then
        echo "ok: $1 sha256 $got"
    else
        echo "FAIL: $1: program printed '${got}', expected $3" >&2
        fail=1
    fi
}

reads=(plain.qcow2 deflate4k.qcow2 deflate64k.qcow2 extl2.qcow2 overlay.qcow2)
for f in "${reads[@]}"; do
    disks=("$f:ro")
    [[ $f == overlay.qcow2 ]] && disks+=(base.qcow2:ro)
    run "$f" false "read $f" "${disks[@]}"
    [[ $rc -eq 0 ]] || { echo "FAIL: read $f: exit status $rc" >&2; fail=1; }
    qemu-img convert -O raw "$f" "$f.raw"
    check_hash "$f" "$f.out" "$(sha256sum "$f.raw" | cut -d' ' -f1)"
done
# The legacy interface (QEMU's default for virtio-mmio), with the backing disk attached first.
run overlay-legacy true "read overlay.qcow2" base.qcow2:ro overlay.qcow2:ro
[[ $rc -eq 0 ]] || { echo "FAIL: legacy read: exit status $rc" >&2; fail=1; }
grep -q ' legacy$' overlay-legacy.out || { echo "FAIL: the legacy run did not use the legacy interface" >&2; fail=1; }
check_hash overlay.qcow2 overlay-legacy.out "$(sha256sum overlay.qcow2.raw | cut -d' ' -f1)"

for f in "${writes[@]}"; do
    disks=("$f")
    [[ $f == write-overlay.qcow2 ]] && disks+=(base.qcow2:ro)
    run "$f" false "write $f read $f" "${disks[@]}"
    [[ $rc -eq 0 ]] || { echo "FAIL: write $f: exit status $rc" >&2; fail=1; }
    grep -qx "wrote $f" "$f.out" || { echo "FAIL: no 'wrote $f'" >&2; fail=1; continue; }
    check_hash "$f" "$f.out" "$(sha256sum "$f.expected" | cut -d' ' -f1)"
    if ! qemu-img check -q "$f"; then
        echo "FAIL: qemu-img check $f" >&2
        fail=1
    fi
    for w in "${pattern_writes[@]}"; do
        read -r p o l <<<"$w"
        if ! qemu-io -f qcow2 -c "read -P $p $o $l" "$f" | grep -q "^read $l/$l bytes"; then
            echo "FAIL: qemu-io read -P $p $o $l $f" >&2
            fail=1
        fi
    done
    if qemu-img compare -q -f qcow2 -F raw "$f" "$f.expected"; then
        echo "ok: $f: qemu-img check clean, qemu-io reads the patterns, qemu-img compare finds the expected disk"
    else
        echo "FAIL: qemu-img compare: $f differs from the expected disk" >&2
        fail=1
    fi
done

# expect_error NAME OUT PATTERN: exit status 1 and an error line matching PATTERN.
expect_error() {
    if [[ $rc -eq 1 ]] && grep -q "^error: $3" "$2"; then
        echo "ok: $1 fails as it should: $(grep '^error: ' "$2" | head -n1)"
    else
        echo "FAIL: $1: expected exit status 1 and 'error: $3', got status $rc" >&2
        fail=1
    fi
}
want_plain=$(sha256sum plain.qcow2 | cut -d' ' -f1)
run write-ro false "write plain.qcow2" plain.qcow2:ro
expect_error "write into a read-only disk" write-ro.out "write plain.qcow2: Io(ReadOnly)"
[[ $(sha256sum plain.qcow2 | cut -d' ' -f1) == "$want_plain" ]] || { echo "FAIL: plain.qcow2 changed" >&2; fail=1; }
run no-backing false "read overlay.qcow2" overlay.qcow2:ro
expect_error "an overlay without its backing disk" no-backing.out "read overlay.qcow2: Unavailable"
run write-full false "write write-full.qcow2" write-full.qcow2
expect_error "a write into an image with no room" write-full.out "write write-full.qcow2: Io(OutOfRange)"
# The device's own error status (VIRTIO_BLK_S_IOERR), from QEMU's blkdebug: a read error inside the first
# data cluster, and a write error anywhere.
data=$(qemu-img map --output=json plain.qcow2 | grep -o '"offset": [0-9]*' | head -n1 | grep -o '[0-9]*$')
inject="read_aio $((data / 512 + 3))"
run read-eio false "read plain.qcow2" plain.qcow2:ro
expect_error "a device read error" read-eio.out "read plain.qcow2: Io(DeviceIo)"
cp extl2.qcow2 write-eio.qcow2
truncate -s $(($(stat -c %s write-eio.qcow2) + 4 * 1024 * 1024)) write-eio.qcow2
inject=write_aio
run write-eio false "write write-eio.qcow2" write-eio.qcow2
expect_error "a device write error" write-eio.out "write write-eio.qcow2: Io(DeviceIo)"
inject=

[[ $fail -eq 0 ]] || exit 1
echo "virtio: all hashes match, writes check clean, failures are reported"
