#!/usr/bin/env bash
# `qcow2 convert` against `qemu-img convert` on the same inputs with the same options, alternating the two
# tools, several runs per case; prints a markdown table of median wall times, the ratio (qemu-img's time /
# ours: above 1.0 means ours is faster), each side's CPU time and peak memory, and the output sizes. Each
# tool's last output of a case is checked: it equals its source (`qemu-img compare`) and a qcow2 output is
# clean (`qemu-img check`); a failed check fails the script.
#
#   bench/convert.sh [--quick] [--smoke] [--runs N] [--dir DIR] [--keep]
#
#   --quick    256 MiB and 64 MiB inputs instead of 1 GiB and 256 MiB
#   --smoke    16 MiB inputs, one run per case (seconds; what CI runs, through bench/run.sh --smoke)
#   --runs N   runs per tool per case (default 5; the median is reported)
#   --dir DIR  where the files go (default: a directory under ${TMPDIR:-/tmp}); needs about 6 GiB
#   --keep     keep the files afterwards
#
# The cases (BIG is 1 GiB, TEXT 256 MiB):
#   - a fully allocated qcow2 image of random data to raw; that raw file to qcow2;
#   - a raw file of BIG with 10% random data (64 KiB every 640 KiB) and zeros written out elsewhere (so that
#     zero detection, not the file's holes, finds them) to qcow2;
#   - base64 text (compresses to about 3/4) to qcow2 with -c, deflate and zstd;
#   - an overlay that rewrites 10% of a BIG qcow2 base, to qcow2 with -B base -F qcow2 (only the overlay's
#     clusters are copied);
#   - a 3-image chain (the base, an overlay rewriting 10%, another rewriting a different 10%) to raw.
# Both tools use their defaults (qemu-img convert's target cache mode is `unsafe`, and so is ours); inputs are
# read from a warm page cache and each output is removed (and the page cache synced) before its run.
# QEMU_IMG=/path/to/qemu-img selects the qemu-img to compare with.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=5 dir="" keep=0 big=1024 text=256
while (($#)); do
    case $1 in
    --quick) big=256 text=64 ;;
    --smoke) big=16 text=16 runs=1 ;;
    --runs) runs=$2; shift ;;
    --dir) dir=$2; shift ;;
    --keep) keep=1 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
QEMU_IMG=${QEMU_IMG:-$(command -v qemu-img || true)}
[[ -x $QEMU_IMG ]] || { echo "no qemu-img: install qemu-utils or set QEMU_IMG" >&2; exit 1; }
QEMU_IO=${QEMU_IO:-$(dirname "$QEMU_IMG")/qemu-io}
[[ -x $QEMU_IO ]] || QEMU_IO=$(command -v qemu-io || true)
[[ -x $QEMU_IO ]] || { echo "no qemu-io next to qemu-img: install qemu-utils or set QEMU_IO" >&2; exit 1; }
[[ -x /usr/bin/time ]] || { echo "needs GNU time (/usr/bin/time; apt-get install time)" >&2; exit 1; }

cargo build --release -q -p qcow2-hosted
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
OURS=$target_dir/release/qcow2

if [[ -z $dir ]]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/qcow2-convert.XXXXXX"); fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cleanup() { if ((!keep)); then rm -rf "$dir"; fi; }
trap cleanup EXIT

# Writes 64 KiB of PATTERN every 640 KiB from FIRST through IMAGE (qcow2) with one qemu-io run.
rewrite_tenth() {
    local image=$1 pattern=$2 first=$3 args=() off
    for ((off = first; off + 65536 <= big << 20; off += 655360)); do
        args+=(-c "write -q -P $pattern $off 64k")
    done
    "$QEMU_IO" -f qcow2 "${args[@]}" "$image" >/dev/null
}

echo "preparing inputs in $dir (${big} MiB random, ${text} MiB base64 text)" >&2
head -c $((big << 20)) /dev/urandom >"$dir/random.raw"
"$QEMU_IMG" convert -f raw -O qcow2 "$dir/random.raw" "$dir/random.qcow2"
head -c $((text * 3 << 18)) /dev/urandom | base64 -w 0 | head -c $((text << 20)) >"$dir/text.raw"
python3 - "$dir/tenth.raw" $((big << 20)) <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
zeros = bytes(576 << 10)
with open(path, "wb") as f:
    for off in range(0, size, 640 << 10):
        f.write(os.urandom(min(64 << 10, size - off)))
        f.write(zeros[: max(0, min(576 << 10, size - off - (64 << 10)))])
EOF
"$QEMU_IMG" create -q -f qcow2 -b "$dir/random.qcow2" -F qcow2 "$dir/overlay.qcow2"
rewrite_tenth "$dir/overlay.qcow2" 0x5a 0
"$QEMU_IMG" create -q -f qcow2 -b "$dir/overlay.qcow2" -F qcow2 "$dir/top.qcow2"
rewrite_tenth "$dir/top.qcow2" 0x6b $((320 << 10))

# case name | source format | source | output format | options (@DIR@ stands for the files' directory)
cases=(
    "qcow2 -> raw, ${big} MiB random|qcow2|random.qcow2|raw|"
    "raw -> qcow2, ${big} MiB random|raw|random.raw|qcow2|"
    "raw -> qcow2, ${big} MiB, 10% data, zeros written|raw|tenth.raw|qcow2|"
    "raw -> qcow2 -c deflate, ${text} MiB text|raw|text.raw|qcow2|-c -o compression_type=zlib"
    "raw -> qcow2 -c zstd, ${text} MiB text|raw|text.raw|qcow2|-c -o compression_type=zstd"
    "qcow2 -> qcow2 -B, ${big} MiB, 90% in the base|qcow2|overlay.qcow2|qcow2|-B @DIR@/random.qcow2 -F qcow2"
    "3-image chain -> raw, ${big} MiB|qcow2|top.qcow2|raw|"
)

# One run: prints "wall cpu rss_kib size".
one_run() {
    local tool=$1 src_fmt=$2 src=$3 out_fmt=$4 opts=${5//@DIR@/$dir} tv=$dir/time.txt out=$dir/out.$4
    rm -f "$out"
    sync
    cat "$dir/$src" >/dev/null
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %U %S %M" -o "$tv" "$tool" convert -f "$src_fmt" -O "$out_fmt" $opts "$dir/$src" "$out"
    read -r wall user sys rss <"$tv"
    echo "$wall $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }') $rss $(stat -c %s "$out")"
}

# The output of TOOL's last run equals the source, and a qcow2 output is clean. (Both tools write the same
# output file, so that only one output exists at a time: a second 1 GiB file in the page cache slows the
# writes of either tool by a factor of two to four on this machine.)
verify() {
    local tool=$1 src_fmt=$2 src=$3 out_fmt=$4 name=$5 out=$dir/out.$4
    if ! "$QEMU_IMG" compare -f "$src_fmt" -F "$out_fmt" "$dir/$src" "$out" >/dev/null; then
        echo "$name: $(basename "$tool")'s output differs from the source" >&2
        exit 1
    fi
    if [[ $out_fmt == qcow2 ]] && ! "$QEMU_IMG" check -q "$out"; then
        echo "$name: $(basename "$tool")'s output is not clean" >&2
        exit 1
    fi
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { printf '%s\n' "${@:2}" | cut -d' ' -f"$1" | median; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

echo "qcow2 convert vs $("$QEMU_IMG" --version | head -n1) convert; median of $runs runs; $(nproc) CPUs: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
echo
echo "| case | ours (s) | qemu-img (s) | ratio | ours CPU (s) | qemu-img CPU (s) | ours RSS (MiB) | qemu-img RSS (MiB) | ours output (B) | qemu-img output (B) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in "${cases[@]}"; do
    IFS='|' read -r name src_fmt src out_fmt opts <<<"$c"
    echo "running: $name ($runs runs each)" >&2
    ours=() qemu=()
    for ((r = 0; r < runs; r++)); do
        ours+=("$(one_run "$OURS" "$src_fmt" "$src" "$out_fmt" "$opts")")
        if ((r == runs - 1)); then verify "$OURS" "$src_fmt" "$src" "$out_fmt" "$name"; fi
        qemu+=("$(one_run "$QEMU_IMG" "$src_fmt" "$src" "$out_fmt" "$opts")")
        if ((r == runs - 1)); then verify "$QEMU_IMG" "$src_fmt" "$src" "$out_fmt" "$name"; fi
    done
    ow=$(col 1 "${ours[@]}") qw=$(col 1 "${qemu[@]}")
    ratio=$(awk -v q="$qw" -v o="$ow" 'BEGIN { printf "%.2f", q / (o > 0.005 ? o : 0.005) }')
    echo "| $name | $ow | $qw | **$ratio** | $(col 2 "${ours[@]}") | $(col 2 "${qemu[@]}") |" \
        "$(mib "$(col 3 "${ours[@]}")") | $(mib "$(col 3 "${qemu[@]}")") | $(col 4 "${ours[@]}") | $(col 4 "${qemu[@]}") |"
done
