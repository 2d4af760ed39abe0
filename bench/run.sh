#!/usr/bin/env bash
# Side-by-side benchmark: `qcow2 bench` (this engine) against `qemu-img bench` on the same images with the same
# options, alternating the two tools, several runs per case; prints a markdown table of medians and ratios and
# the peak memory (maximum resident set) of each side; then the convert cases of bench/convert.sh (`qcow2
# convert` against `qemu-img convert`) at the same size.
#
#   bench/run.sh [--quick] [--smoke] [--runs N] [--dir DIR] [--drop-caches] [--keep]
#
#   --quick        smaller images and counts, one depth (for development; about a minute)
#   --smoke        tiny images, one run per case (seconds; what CI runs)
#   --runs N       runs per tool per case (default 5; the median is reported)
#   --dir DIR      where the images go (default: a directory under ${TMPDIR:-/tmp}); needs ~11 GiB free
#   --drop-caches  drop the page cache before every run (needs root and /proc/sys/vm writable); by default the
#                  images are read from a warm page cache, so both tools measure the format's cost, not the disk
#   --keep         keep the images afterwards
#
# QEMU_IMG=/path/to/qemu-img selects the qemu-img to compare with (default: qemu-img on PATH, else
# $QCOW2_QEMU_DIR/qemu-img); QEMU_LIBS adds to its LD_LIBRARY_PATH.
#
# Ratio = qemu-img's median time / ours: ours faster => ratio >= 1.0. "vs raw" = the same tool's time on the
# raw file / its time on the qcow2 image, for the read cases that have a raw twin (1.0 = as fast as raw).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=full runs=5 dir="" drop=0 keep=0
while (($#)); do
    case $1 in
    --quick) mode=quick ;;
    --smoke) mode=smoke runs=1 ;;
    --runs) runs=$2; shift ;;
    --dir) dir=$2; shift ;;
    --drop-caches) drop=1 ;;
    --keep) keep=1 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

QEMU_IMG=${QEMU_IMG:-}
if [[ -z $QEMU_IMG ]]; then
    if command -v qemu-img >/dev/null 2>&1; then
        QEMU_IMG=$(command -v qemu-img)
    elif [[ -n ${QCOW2_QEMU_DIR:-} ]]; then
        QEMU_IMG=$QCOW2_QEMU_DIR/qemu-img
        QEMU_LIBS=${QEMU_LIBS:-${QCOW2_QEMU_LIBS:-}}
    else
        echo "no qemu-img: install qemu-utils or set QEMU_IMG" >&2
        exit 1
    fi
fi
if [[ -n ${QEMU_LIBS:-} ]]; then export LD_LIBRARY_PATH=$QEMU_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
[[ -x /usr/bin/time ]] || { echo "needs GNU time (/usr/bin/time; apt-get install time)" >&2; exit 1; }

cargo build --release -q -p qcow2-hosted
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
OURS=$target_dir/release/qcow2

if [[ -z $dir ]]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/qcow2-bench.XXXXXX"); fi
mkdir -p "$dir"
cleanup() { if ((keep == 0)); then rm -rf "$dir"; fi; }
trap cleanup EXIT

# Sizes (MiB) and request counts.
case $mode in
full) seq_mb=1024 rand_mb=4096 comp_mb=256 write_mb=1024 rand_count=200000 ow_count=100000 depths="1 16" ;;
quick) seq_mb=256 rand_mb=1024 comp_mb=64 write_mb=256 rand_count=50000 ow_count=25000 depths="1 16" ;;
smoke) seq_mb=16 rand_mb=32 comp_mb=8 write_mb=16 rand_count=2000 ow_count=1000 depths="1 16" ;;
esac
# A stride of an odd number of 4 KiB blocks visits the blocks of a power-of-two sized image in a scattered
# order without repeats: qemu-img bench has no random mode, this is its usual stand-in.
rand_step=$((4096 * 300007))

q() { "$QEMU_IMG" "$@"; }

echo "preparing images in $dir (${seq_mb} MiB sequential, ${rand_mb} MiB random, ${comp_mb} MiB compressed)" >&2
head -c $((seq_mb << 20)) /dev/urandom >"$dir/seq.raw"
q convert -f raw -O qcow2 "$dir/seq.raw" "$dir/seq.qcow2"
: >"$dir/rand.raw"
for ((i = 0; i < rand_mb / seq_mb; i++)); do cat "$dir/seq.raw" >>"$dir/rand.raw"; done
q convert -f raw -O qcow2 "$dir/rand.raw" "$dir/rand.qcow2"
# Compressible data (base64 text of random bytes, about 3:4) for the compressed images.
head -c $((comp_mb * 3 << 18)) /dev/urandom | base64 -w 0 | head -c $((comp_mb << 20)) >"$dir/comp.raw"
q convert -c -f raw -O qcow2 -o compression_type=zlib "$dir/comp.raw" "$dir/deflate.qcow2"
q convert -c -f raw -O qcow2 -o compression_type=zstd "$dir/comp.raw" "$dir/zstd.qcow2"
cp "$dir/seq.qcow2" "$dir/overwrite.qcow2"

# case name | image (fresh:SIZE creates an empty qcow2 before each run) | bench options | raw twin
cases=()
seq_count=$((seq_mb * 16))
write_count=$((write_mb * 16))
comp_count=$((comp_mb * 16))
cases+=("seq 64k read|seq.qcow2|-c $seq_count -s 64k|seq.raw")
cases+=("rand 4k read|rand.qcow2|-c $rand_count -s 4k -S $rand_step|rand.raw")
cases+=("seq 64k alloc write|fresh:${write_mb}M|-w -c $write_count -s 64k|")
cases+=("rand 4k overwrite|overwrite.qcow2|-w -c $ow_count -s 4k -S $rand_step|")
cases+=("deflate 64k read|deflate.qcow2|-c $comp_count -s 64k|")
cases+=("zstd 64k read|zstd.qcow2|-c $comp_count -s 64k|")

# One run: prints "seconds rss_kib".
one_run() {
    local tool=$1 img=$2 fmt=$3
    shift 3
    local out="$dir/out.txt" tv="$dir/time.txt"
    # Start every run with no dirty pages left by the one before (its writeback would land in this run).
    sync
    if ((drop)); then echo 3 >/proc/sys/vm/drop_caches; fi
    if [[ $tool == ours ]]; then
        /usr/bin/time -v -o "$tv" "$OURS" bench -f "$fmt" "$@" "$img" >"$out" 2>&1 || { cat "$out" >&2; return 1; }
    else
        /usr/bin/time -v -o "$tv" "$QEMU_IMG" bench -f "$fmt" "$@" "$img" >"$out" 2>&1 || { cat "$out" >&2; return 1; }
    fi
    local secs rss
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$out")
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): *//p' "$tv")
    [[ -n $secs ]] || { cat "$out" >&2; return 1; }
    echo "$secs $rss"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max() { sort -g | tail -n 1; }

# Runs one case at one depth on one image for both tools, alternating; prints "ours_med qemu_med ours_rss qemu_rss".
run_case() {
    local image=$1 fmt=$2 opts=$3 depth=$4
    local ot=() qt=() orss=() qrss=() r img
    # Read the image once so that both tools start from the same warm page cache (the big images can push
    # each other out of it).
    if [[ $image != fresh:* ]] && ((drop == 0)); then cat "$dir/$image" >/dev/null; fi
    for ((r = 0; r < runs; r++)); do
        for tool in ours qemu; do
            if [[ $image == fresh:* ]]; then
                img="$dir/fresh.qcow2"
                q create -q -f qcow2 "$img" "${image#fresh:}"
            else
                img="$dir/$image"
            fi
            # shellcheck disable=SC2086
            read -r s m < <(one_run "$tool" "$img" "$fmt" $opts -d "$depth")
            if [[ $tool == ours ]]; then ot+=("$s"); orss+=("$m"); else qt+=("$s"); qrss+=("$m"); fi
        done
    done
    echo "$(printf '%s\n' "${ot[@]}" | median) $(printf '%s\n' "${qt[@]}" | median) $(printf '%s\n' "${orss[@]}" | max) $(printf '%s\n' "${qrss[@]}" | max)"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

rows=()
for c in "${cases[@]}"; do
    IFS='|' read -r name image opts raw <<<"$c"
    for depth in $depths; do
        echo "running: $name, depth $depth ($runs runs each)" >&2
        read -r om qm orss qrss < <(run_case "$image" qcow2 "$opts" "$depth")
        vsraw_o="" vsraw_q=""
        if [[ -n $raw ]]; then
            read -r rom rqm rorss rqrss < <(run_case "$raw" raw "$opts" "$depth")
            vsraw_o=$(ratio "$rom" "$om") vsraw_q=$(ratio "$rqm" "$qm")
            rows+=("| $name (raw file, -f raw) | $depth | $rom | $rqm | $(ratio "$rqm" "$rom") | | $(mib "$rorss") | $(mib "$rqrss") |")
        fi
        rows+=("| $name | $depth | $om | $qm | **$(ratio "$qm" "$om")** | ${vsraw_o:+$vsraw_o / $vsraw_q} | $(mib "$orss") | $(mib "$qrss") |")
    done
done

echo
echo "qcow2 bench vs $("$QEMU_IMG" --version | head -n1) bench; median of $runs runs; $(nproc) CPUs: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1); page cache $( ((drop)) && echo dropped before each run || echo warm)"
echo
echo "| case | depth | ours (s) | qemu-img (s) | ratio | vs raw (ours / qemu) | ours peak RSS (MiB) | qemu-img peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"

# The convert cases (bench/convert.sh: qcow2 convert against qemu-img convert), at the same size.
echo
convert_args=(--runs "$runs")
case $mode in
quick) convert_args+=(--quick) ;;
smoke) convert_args=(--smoke) ;;
esac
bash bench/convert.sh "${convert_args[@]}"
