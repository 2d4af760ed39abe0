#!/usr/bin/env bash
# Runs qcow2-cortex-m on qemu-system-arm's mps2-an386 (Cortex-M4) against images made by qemu-img, and checks
# what it prints and writes against QEMU's own tools:
# - `read` jobs: the SHA-256 the program computes over each virtual disk must equal `sha256sum` of
#   `qemu-img convert -O raw` (plain, deflate-compressed with 4 KiB and 64 KiB clusters, extended L2, an
#   overlay whose backing file the program opens by name through semihosting);
# - `write` jobs: after the program's writes (src/main.rs WRITES), `qemu-img check` must find the image
#   clean, `qemu-io -c 'read -P ...'` must read every pattern back, and the whole disk must equal a raw copy
#   to which qemu-io made the same writes.
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
elf=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
elf=$elf/thumbv7em-none-eabihf/release/qcow2-cortex-m

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The images (the same for targets/cortex-m and targets/virtio).
# shellcheck source=../guest-images.sh
source "$targets/guest-images.sh"

reads=(plain.qcow2 deflate4k.qcow2 deflate64k.qcow2 extl2.qcow2 overlay.qcow2)
writes=(write-overlay.qcow2 write-extl2.qcow2)
{
    for f in "${reads[@]}"; do echo "read $f"; done
    for f in "${writes[@]}"; do echo "write $f"; done
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

peak=$(sed -n 's/^stack-peak //p' out.txt)
[[ -n $peak ]] || { echo "FAIL: no stack-peak line" >&2; fail=1; }
if [[ -n $stack_out && -n $peak ]]; then echo "$peak" >"$stack_out"; fi
[[ $fail -eq 0 ]] || exit 1
echo "cortex-m: all hashes match, writes check clean; peak stack: $peak (bytes)"
