#!/bin/sh
# Recreates sample.qcow2: a 16 MiB (virtual) qcow2 image, 64 KiB clusters, compat 1.1, with deflate-
# compressed clusters of recognizable text, pattern runs, an uncompressed overwrite and a zero cluster.
# Needs qemu-img and qemu-io. Usage: make-sample.sh [OUTPUT] (default: sample.qcow2 beside this script).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/sample.qcow2"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

qemu-img create -q -f raw "$tmp/src.raw" 16M
i=0
while [ $i -lt 3000 ]; do
    printf 'qcow2-engine sample image, line %05d: The quick brown fox jumps over the lazy dog.\n' $i
    i=$((i + 1))
done > "$tmp/text"
# text at offset 0 (about 260 KiB) and again at 5 MiB + 12345 (unaligned)
dd if="$tmp/text" of="$tmp/src.raw" conv=notrunc status=none
dd if="$tmp/text" of="$tmp/src.raw" bs=1 seek=$((5 * 1048576 + 12345)) conv=notrunc status=none
qemu-io -f raw \
    -c 'write -P 0xa5 3000000 70000' \
    -c 'write -P 0x3c 10485760 131072' \
    -c 'write -P 0x7e 16775000 2000' \
    "$tmp/src.raw" >/dev/null
rm -f "$out"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536,compat=1.1 "$tmp/src.raw" "$out"
# on top of the compressed image: an uncompressed partial overwrite of a compressed cluster
# (copy-on-write through inflate) and a zero cluster
qemu-io -f qcow2 \
    -c 'write -P 0x5a 8388000 1000' \
    -c 'write -P 0x42 100000 3000' \
    -c 'write -z 12582912 65536' \
    "$out" >/dev/null
