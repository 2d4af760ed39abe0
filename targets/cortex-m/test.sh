#!/usr/bin/env bash
# Runs qcow2-cortex-m on qemu-system-arm's mps2-an386 (Cortex-M4) against images made by qemu-img, and checks
# what it prints and writes against QEMU's own tools:
# - `read` jobs: the SHA-256 the program computes over each virtual disk must equal `sha256sum` of
#   `qemu-img convert -O raw` (plain, deflate-compressed with 4 KiB and 64 KiB clusters, extended L2, an
#   overlay whose backing file the program opens by name through semihosting);
# - `write` jobs: after the program's writes (src/main.rs WRITES), `qemu-img check` must find the image
#   clean, `qemu-io -c 'read -P ...'` must read every pattern back, and the whole disk must equal a raw copy
#   to which qemu-io made the same writes.
# - `snapshot` and `rollback` jobs: on a copy of plain.qcow2 the program creates snapshot `before`, doubles
#   the disk and makes the writes; `qemu-img check` must find it clean, qemu-img must list the snapshot and
#   read it as the original disk, and the active disk must equal a raw copy resized and written by qemu-io.
#   On a second copy it then applies the snapshot: clean, the snapshot still listed, the disk the original.
# - the `unlock` job, by the program built again with the `luks` feature: a LUKS-encrypted copy of plain.qcow2
#   (qemu-img, encrypt.iter-time=10: PBKDF2 iterations calibrated on this host, printed) must hash as
#   qemu-img reads it with the passphrase; the time the emulated Cortex-M took to unlock it is printed (a
#   figure of the host's emulation speed, not a test).
# Prints the program's RAM figures and its peak stack per job; writes "read BYTES write BYTES" (the largest
# peak of each kind of job) to $1 when given, for targets/budget.sh.
# Fails (never skips) when qemu-system-arm, qemu-img or qemu-io is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
targets=$(cd .. && pwd)
stack_out=${1:-}

for tool in qemu-system-arm qemu-img qemu-io sha256sum; do
    command -v "$tool" >/dev/null || { echo "cortex-m test: $tool is missing" >&2; exit 1; }
done

cargo build --release
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
elf=$target_dir/thumbv7em-none-eabihf/release/qcow2-cortex-m
cargo build --release --features luks --target-dir "$target_dir/luks"
elf_luks=$target_dir/luks/thumbv7em-none-eabihf/release/qcow2-cortex-m

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The images (the same for targets/cortex-m and targets/virtio).
# shellcheck source=../guest-images.sh
source "$targets/guest-images.sh"

reads=(plain.qcow2 deflate4k.qcow2 deflate64k.qcow2 extl2.qcow2 overlay.qcow2)
writes=(write-overlay.qcow2 write-extl2.qcow2)
cp plain.qcow2 snap.qcow2
cp plain.qcow2 rollback.qcow2
qemu-img convert -O raw plain.qcow2 original.raw
{
    for f in "${reads[@]}"; do echo "read $f"; done
    for f in "${writes[@]}"; do echo "write $f"; done
    echo "snapshot snap.qcow2"
    echo "snapshot rollback.qcow2"
    echo "rollback rollback.qcow2"
} >jobs.txt

# The expected disks after the writes: raw copies with the same writes made by qemu-io.
size=$((8 * 1024 * 1024))
pattern_writes=("0xa5 $((65536 + 1000)) 5000" "0x3c $((3 * 1024 * 1024 + 7)) 70000" "0x5a $((size - 4096)) 4096")
for f in "${writes[@]}"; do
    qemu-img convert -O raw "$f" "$f.expected"
    args=()
    for w in "${pattern_writes[@]}"; do
        read -r p o l <<<"$w"
        args+=(-c "write -P $p $o $l")
    done
    qemu-io -f raw "${args[@]}" "$f.expected" >/dev/null
done

start=$SECONDS
set +e
timeout 120 qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none \
    -semihosting-config enable=on,target=native -kernel "$elf" >out.txt 2>&1
rc=$?
set -e
cat out.txt
echo "(qemu-system-arm ran $((SECONDS - start))s, exit status $rc)"
fail=0
[[ $rc -eq 0 ]] || { echo "FAIL: the program exited with status $rc" >&2; fail=1; }

for f in "${reads[@]}"; do
    qemu-img convert -O raw "$f" "$f.raw"
    want=$(sha256sum "$f.raw" | cut -d' ' -f1)
    got=$(sed -n "s/^sha256 $f //p" out.txt)
    if [[ $got == "$want" ]]; then
        echo "ok: $f sha256 $got"
    else
        echo "FAIL: $f: program printed '${got}', qemu-img convert gives $want" >&2
        fail=1
    fi
done

for f in "${writes[@]}"; do
    grep -qx "wrote $f" out.txt || { echo "FAIL: no 'wrote $f'" >&2; fail=1; continue; }
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
    qemu-img convert -O raw "$f" "$f.raw"
    if cmp -s "$f.raw" "$f.expected"; then
        echo "ok: $f: qemu-img check clean, qemu-io reads the patterns, the whole disk is as expected"
    else
        echo "FAIL: $f differs from the expected disk" >&2
        fail=1
    fi
done

# The snapshot jobs.
grep -qx "snapshot snap.qcow2" out.txt || { echo "FAIL: no 'snapshot snap.qcow2'" >&2; fail=1; }
grep -qx "rolled back rollback.qcow2" out.txt || { echo "FAIL: no 'rolled back rollback.qcow2'" >&2; fail=1; }
cp original.raw snap.expected
truncate -s $((2 * size)) snap.expected
args=()
for w in "${pattern_writes[@]}"; do
    read -r p o l <<<"$w"
    ((o == size - 4096)) && o=$((2 * size - 4096))
    args+=(-c "write -P $p $o $l")
done
qemu-io -f raw "${args[@]}" snap.expected >/dev/null
for f in snap.qcow2 rollback.qcow2; do
    qemu-img check -q "$f" || { echo "FAIL: qemu-img check $f" >&2; fail=1; }
    qemu-img snapshot -l "$f" | grep -q "^1 *before " || { echo "FAIL: $f has no snapshot 'before'" >&2; fail=1; }
    qemu-img convert -l snapshot.name=before -O raw "$f" "$f.snap.raw"
    # (qemu-img reads a snapshot at the active disk's size: the original disk, then zeros.)
    cmp -s -n "$size" "$f.snap.raw" original.raw || { echo "FAIL: $f: snapshot 'before' is not the original disk" >&2; fail=1; }
done
qemu-img convert -O raw snap.qcow2 snap.raw
cmp -s snap.raw snap.expected || { echo "FAIL: snap.qcow2: the resized and written disk differs" >&2; fail=1; }
qemu-img convert -O raw rollback.qcow2 rollback.raw
cmp -s rollback.raw original.raw || { echo "FAIL: rollback.qcow2 is not the original disk" >&2; fail=1; }
echo "ok: snapshot, resize and rollback jobs: qemu-img check clean, the snapshot reads as the original disk," \
    "the resized disk as expected, the rolled-back disk the original; peak stack $(sed -n 's/^stack-peak-snapshots //p' out.txt) bytes"

# The unlock job.
secret="secret,id=s0,data=cortex-m-passphrase"
qemu-img convert -O qcow2 --object "$secret" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
    plain.qcow2 luks.qcow2
echo "unlock luks.qcow2" >jobs.txt
set +e
timeout 300 qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none \
    -semihosting-config enable=on,target=native -kernel "$elf_luks" >out-luks.txt 2>&1
rc=$?
set -e
cat out-luks.txt
[[ $rc -eq 0 ]] || { echo "FAIL: the luks program exited with status $rc" >&2; fail=1; }
want=$(qemu-img convert -O raw --object "$secret" --image-opts \
    driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0 luks.raw && sha256sum luks.raw | cut -d' ' -f1)
got=$(sed -n "s/^sha256 luks.qcow2 //p" out-luks.txt)
iters=$(qemu-img info --output=json luks.qcow2 | python3 -c 'import json,sys
e = json.load(sys.stdin)["format-specific"]["data"]["encrypt"]
print(e["slots"][0]["iters"], e["master-key-iters"], e["cipher-alg"], e["cipher-mode"], e["hash-alg"])')
read -r slot_iters master_iters alg mode hash <<<"$iters"
took=$(sed -n "s/^unlock luks.qcow2 //p" out-luks.txt)
stack_unlock=$(sed -n "s/^stack unlock luks.qcow2 //p" out-luks.txt)
if [[ -n $got && $got == "$want" ]]; then
    echo "ok: luks.qcow2 ($alg-$mode, $hash; PBKDF2 $slot_iters iterations for the key slot, $master_iters for" \
        "the digest) unlocked in $((${took:-0} * 10)) ms of host time under emulation (peak stack" \
        "$stack_unlock bytes: unlock and read); sha256 $got"
else
    echo "FAIL: luks.qcow2: program printed '${got}', qemu-img convert gives $want" >&2
    fail=1
fi

peak=$(sed -n 's/^stack-peak //p' out.txt)
[[ -n $peak ]] || { echo "FAIL: no stack-peak line" >&2; fail=1; }
if [[ -n $stack_out && -n $peak ]]; then echo "$peak" >"$stack_out"; fi
[[ $fail -eq 0 ]] || exit 1
echo "cortex-m: all hashes match, writes check clean; peak stack: $peak (bytes)"
