#!/usr/bin/env bash
# Boots a qcow2 disk in OVMF through targets/uefi's qcow2-boot and waits for the payload's line.
#
# The disk: GPT, one EFI system partition (FAT) holding \EFI\BOOT\ (empty) in the base image and
# \EFI\BOOT\BOOTX64.EFI (the payload) in the overlay only. The base is converted to a deflate-compressed
# qcow2 (base.qcow2); the overlay (overlay.qcow2, backing file base.qcow2) holds only the clusters that
# differ. Both are attached to QEMU as raw virtio disks (format=raw: QEMU does not interpret them), so only
# qcow2-core understands qcow2. qcow2-boot.efi is started by OVMF from a small read-only FAT drive (QEMU's
# vvfat) as \EFI\BOOT\BOOTX64.EFI. The test passes when the payload's line appears on the serial output
# within the time limit (QCOW2_UEFI_TIMEOUT seconds, 180 by default). Fails (never skips) when a tool is
# missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
LINE="qcow2-payload: booted from inside the qcow2 image"
limit=${QCOW2_UEFI_TIMEOUT:-180}

for tool in qemu-system-x86_64 qemu-img sgdisk mkfs.fat mmd mcopy; do
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
esp_sectors=$((32 * 2048))
mkfs.fat -C -F 16 -n QCOW2ESP esp-base.img $((esp_sectors / 2)) >/dev/null
mmd -i esp-base.img ::/EFI ::/EFI/BOOT
cp esp-base.img esp-top.img
mcopy -i esp-top.img "$out/payload.efi" ::/EFI/BOOT/BOOTX64.EFI
for v in base top; do
    truncate -s 40M disk-$v.raw
    sgdisk -o -n 1:2048:+$esp_sectors -t 1:ef00 -c 1:ESP -U 11111111-2222-3333-4444-555555555555 \
        -u 1:66666666-7777-8888-9999-000000000000 disk-$v.raw >/dev/null
    [[ $(dd if=disk-$v.raw bs=1 skip=512 count=8 status=none) == "EFI PART" ]] || { echo "no GPT made" >&2; exit 1; }
    dd if=esp-$v.img of=disk-$v.raw bs=512 seek=2048 conv=notrunc status=none
done
qemu-img convert -c -O qcow2 disk-base.raw base.qcow2
qemu-img convert -O qcow2 -B base.qcow2 -F qcow2 disk-top.raw overlay.qcow2
qemu-img convert -O raw overlay.qcow2 check.raw && cmp check.raw disk-top.raw && rm check.raw
# Whole sectors, so the raw view of each file is all of it.
truncate -s %512 base.qcow2 overlay.qcow2
ls -l base.qcow2 overlay.qcow2

mkdir -p boot/EFI/BOOT
cp "$out/qcow2-boot.efi" boot/EFI/BOOT/BOOTX64.EFI
cp "$vars" vars.fd

qemu-system-x86_64 -machine q35 -m 256 -nographic -no-reboot -net none \
    -drive if=pflash,format=raw,readonly=on,file="$code" -drive if=pflash,format=raw,file=vars.fd \
    -drive if=virtio,format=raw,readonly=on,file=fat:boot \
    -drive if=virtio,format=raw,readonly=on,file=overlay.qcow2 \
    -drive if=virtio,format=raw,readonly=on,file=base.qcow2 \
    -serial mon:stdio </dev/null >serial.txt 2>&1 &
qemu=$!
start=$SECONDS
# Until the line shows, QEMU ends (the payload powers off), qcow2-boot reports a failure, or time runs out.
while kill -0 "$qemu" 2>/dev/null && ((SECONDS - start < limit)); do
    grep -aq -e "$LINE" -e "qcow2-boot: failed" serial.txt 2>/dev/null && break
    sleep 1
done
sleep 1
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null
rc=$?
echo "(qemu-system-x86_64 ran $((SECONDS - start))s); what it printed about booting:"
tr -d '\r' <serial.txt | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' | grep -a -E 'qcow2|BdsDxe' | head -40 || true
if tr -d '\r' <serial.txt | grep -aq "$LINE"; then
    echo "uefi: the payload ran from inside the qcow2 disk (qemu exit status $rc)"
else
    echo "FAIL: no '$LINE' on the serial output within ${limit}s (qemu exit status $rc); its tail:" >&2
    tail -c 3000 serial.txt | tr -d '\r' >&2
    exit 1
fi
