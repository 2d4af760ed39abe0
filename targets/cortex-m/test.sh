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

# The guest data: patterns, holes, zero clusters, unaligned edges.
qemu-img create -q -f qcow2 plain.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 100k' -c 'write -P 0x22 1M 300k' -c 'write -z 2M 64k' \
    -c 'write -P 0x33 3000k 1000k' -c 'write -P 0x44 8188k 4k' plain.qcow2 >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 plain.qcow2 deflate4k.qcow2
qemu-img convert -c -O qcow2 plain.qcow2 deflate64k.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k extl2.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x55 0 6k' -c 'write -P 0x66 70k 2k' -c 'write -P 0x77 1M 130k' \
    -c 'write -z 1030k 4k' -c 'write -P 0x88 5000k 1k' extl2.qcow2 >/dev/null
# A compressed base and an overlay that names it (relative: QEMU's working directory is this one).
cp deflate4k.qcow2 base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x99 50k 20k' -c 'write -z 1100k 8k' -c 'write -P 0xaa 4M 64k' \
    overlay.qcow2 >/dev/null
# Images the program writes into: an overlay (copy-on-write from the backing file) and an extended-L2 one.
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 write-overlay.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0xbb 64k 4k' write-overlay.qcow2 >/dev/null
cp extl2.qcow2 write-extl2.qcow2

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
