#!/usr/bin/env bash
# `qcow2 convert` against `qemu-img convert` on the same inputs with the same options, alternating the two
# tools, several runs per case; prints a markdown table of median wall times, the ratio (qemu-img's time /
# ours: above 1.0 means ours is faster), each side's CPU time, and the output sizes.
#
#   bench/convert.sh [--quick] [--smoke] [--runs N] [--dir DIR] [--keep]
#
#   --quick    256 MiB and 64 MiB inputs instead of 1 GiB and 256 MiB
#   --smoke    16 MiB inputs, one run per case (seconds)
#   --runs N   runs per tool per case (default 5; the median is reported)
#   --dir DIR  where the files go (default: a directory under ${TMPDIR:-/tmp}); needs about 5 GiB
#   --keep     keep the files afterwards
#
# The cases: a fully allocated qcow2 image of random data to raw; the raw file of random data to qcow2; base64
# text (compresses to about 3/4) to qcow2 with -c, deflate and zstd. Both tools use their defaults (qemu-img
# convert's target cache mode is `unsafe`, and so is ours); inputs are read from a warm page cache and each
# output is removed before its run. QEMU_IMG=/path/to/qemu-img selects the qemu-img to compare with.
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
[[ -x /usr/bin/time ]] || { echo "needs GNU time (/usr/bin/time; apt-get install time)" >&2; exit 1; }

cargo build --release -q -p qcow2-hosted
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
OURS=$target_dir/release/qcow2

if [[ -z $dir ]]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/qcow2-convert.XXXXXX"); fi
mkdir -p "$dir"
cleanup() { if ((!keep)); then rm -rf "$dir"; fi; }
trap cleanup EXIT

echo "preparing inputs in $dir (${big} MiB random, ${text} MiB base64 text)" >&2
head -c $((big << 20)) /dev/urandom >"$dir/random.raw"
"$QEMU_IMG" convert -f raw -O qcow2 "$dir/random.raw" "$dir/random.qcow2"
head -c $((text * 3 << 18)) /dev/urandom | base64 -w 0 | head -c $((text << 20)) >"$dir/text.raw"

# case name | source format | source | output format | options
cases=(
    "qcow2 -> raw, ${big} MiB random|qcow2|random.qcow2|raw|"
    "raw -> qcow2, ${big} MiB random|raw|random.raw|qcow2|"
    "raw -> qcow2 -c deflate, ${text} MiB text|raw|text.raw|qcow2|-c -o compression_type=zlib"
    "raw -> qcow2 -c zstd, ${text} MiB text|raw|text.raw|qcow2|-c -o compression_type=zstd"
)

# One run: prints "wall cpu size".
one_run() {
    local tool=$1 src_fmt=$2 src=$3 out_fmt=$4 opts=$5 out=$dir/out.$4 tv=$dir/time.txt
    rm -f "$out"
    sync
    cat "$dir/$src" >/dev/null
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %U %S" -o "$tv" "$tool" convert -f "$src_fmt" -O "$out_fmt" $opts "$dir/$src" "$out"
    read -r wall user sys <"$tv"
    echo "$wall $(echo "$user + $sys" | bc) $(stat -c %s "$out")"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "qcow2 convert vs $("$QEMU_IMG" --version | head -n1) convert; median of $runs runs; $(nproc) CPUs"
echo
echo "| case | ours (s) | qemu-img (s) | ratio | ours CPU (s) | qemu-img CPU (s) | ours output (B) | qemu-img output (B) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for c in "${cases[@]}"; do
    IFS='|' read -r name src_fmt src out_fmt opts <<<"$c"
    ours=() qemu=()
    for ((r = 0; r < runs; r++)); do
        ours+=("$(one_run "$OURS" "$src_fmt" "$src" "$out_fmt" "$opts")")
        qemu+=("$(one_run "$QEMU_IMG" "$src_fmt" "$src" "$out_fmt" "$opts")")
    done
    ow=$(printf '%s\n' "${ours[@]}" | cut -d' ' -f1 | median)
    qw=$(printf '%s\n' "${qemu[@]}" | cut -d' ' -f1 | median)
    oc=$(printf '%s\n' "${ours[@]}" | cut -d' ' -f2 | median)
    qc=$(printf '%s\n' "${qemu[@]}" | cut -d' ' -f2 | median)
    os=$(printf '%s\n' "${ours[@]}" | cut -d' ' -f3 | median)
    qs=$(printf '%s\n' "${qemu[@]}" | cut -d' ' -f3 | median)
    ratio=$(awk -v q="$qw" -v o="$ow" 'BEGIN { printf "%.2f", q / (o > 0.005 ? o : 0.005) }')
    echo "| $name | $ow | $qw | **$ratio** | $oc | $qc | $os | $qs |"
done
