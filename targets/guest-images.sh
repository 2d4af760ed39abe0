# Sourced by targets/cortex-m/test.sh and targets/virtio/test.sh, in their work directory: the qcow2 images
# both programs read and write, made by qemu-img and qemu-io.
#   read:  plain.qcow2, deflate4k.qcow2, deflate64k.qcow2, extl2.qcow2, overlay.qcow2 (backing base.qcow2)
#   write: write-overlay.qcow2 (backing base.qcow2), write-extl2.qcow2

# The guest data: patterns, holes, zero clusters, unaligned edges.
qemu-img create -q -f qcow2 plain.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 100k' -c 'write -P 0x22 1M 300k' -c 'write -z 2M 64k' \
    -c 'write -P 0x33 3000k 1000k' -c 'write -P 0x44 8188k 4k' plain.qcow2 >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 plain.qcow2 deflate4k.qcow2
qemu-img convert -c -O qcow2 plain.qcow2 deflate64k.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k extl2.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x55 0 6k' -c 'write -P 0x66 70k 2k' -c 'write -P 0x77 1M 130k' \
    -c 'write -z 1030k 4k' -c 'write -P 0x88 5000k 1k' extl2.qcow2 >/dev/null
# A compressed base and an overlay that names it by a relative name (the programs open it by that name:
# from QEMU's working directory, or as the disk with that serial).
cp deflate4k.qcow2 base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x99 50k 20k' -c 'write -z 1100k 8k' -c 'write -P 0xaa 4M 64k' \
    overlay.qcow2 >/dev/null
# Images the programs write into: an overlay (copy-on-write from the backing file) and an extended-L2 one.
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 write-overlay.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0xbb 64k 4k' write-overlay.qcow2 >/dev/null
cp extl2.qcow2 write-extl2.qcow2
