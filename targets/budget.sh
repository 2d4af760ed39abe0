#!/usr/bin/env bash
# Budgets of the qcow2-core engine on thumbv7em-none-eabihf (Cortex-M4F) at opt-level "z", LTO, panic=abort:
#
#   flash (.text + .rodata) of the read-only engine with deflate      <= 32 KiB  (targets/budget ro-deflate)
#   flash (.text + .rodata) of the read-write engine                  <= 64 KiB  (targets/budget rw, built
#                                                                                without `dirty-repair`)
#   RAM for an uncompressed read, besides the metadata cache slices   <=  8 KiB  (size_of Image + bounce block)
#   RAM for a compressed read (everything: image, inflate state,
#       window, input, bounce, metadata cache)                        <= 48 KiB
#   peak stack of the Cortex-M run (targets/cortex-m under QEMU)      <=  8 KiB  (read jobs; write jobs too)
#   panic paths: no qcow2_core function calls a panic entry point; dependencies' sites are allowlisted
#
# The binaries' flash includes their own few hundred bytes of start-up and device glue (`_start`, the opaque
# device); ro-plain (no decompressor) and rw-repair (the read-write engine with qcow2-core's `dirty-repair`,
# which links check's walk and repair so that a writable open can rebuild a dirty image's refcounts) are
# printed for comparison, and so is rw-snapshots (the read-write engine that also resizes and creates,
# applies and deletes snapshots); both get the panic-path check too. ro-luks (the read-only engine with
# deflate and qcow2-core's `luks`: LUKS unlock and decryption) is printed with its flash and RAM; its
# panic-path report is printed for information (the crypto crates' bounds checks, and hmac's key setup
# inlined into the engine's PBKDF2, are not on the allowlist). RAM figures are size_of values for the
# target, stored by the binaries in a `.budget` section. The peak stack comes from targets/cortex-m/test.sh
# (which this script runs unless QCOW2_STACK_FILE names a file it already wrote).
#
# A budget that is not met fails the script, unless targets/budget-waivers.txt lists its name with the
# reason (printed): a waiver that is no longer needed fails too, so the file only ever shrinks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
root=$PWD

for tool in llvm-size llvm-objcopy llvm-objdump llvm-addr2line llvm-cxxfilt python3 od; do
    command -v "$tool" >/dev/null || { echo "budget: $tool is missing" >&2; exit 1; }
done

(cd budget && cargo build --release && cargo build --release --features dirty-repair --bin rw-repair &&
    cargo build --release --features luks --bin ro-luks)
bin_dir=$(cd budget && cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' |
    cut -d'"' -f4)/thumbv7em-none-eabihf/release

flash() { # .text + .rodata of an ELF
    llvm-size -A "$1" | awk '$1 == ".text" || $1 == ".rodata" { s += $2 } END { print s }'
}
ram_words() { # the u32 words of the .budget section
    local tmp
    tmp=$(mktemp)
    llvm-objcopy -O binary --only-section=.budget "$1" "$tmp"
    od -An -tu4 -v "$tmp" | tr -s ' \n' ' '
    rm -f "$tmp"
}

stack_file=${QCOW2_STACK_FILE:-}
if [[ -z $stack_file ]]; then
    stack_file=$(mktemp)
    bash cortex-m/test.sh "$stack_file" >/dev/null
fi
read -r _ stack_read _ stack_write <"$stack_file"

read -r img_plain bounce metadata <<<"$(ram_words "$bin_dir/ro-plain")"
read -r img_deflate _ _ window input <<<"$(ram_words "$bin_dir/ro-deflate")"
ro_plain=$(flash "$bin_dir/ro-plain")
ro_deflate=$(flash "$bin_dir/ro-deflate")
rw=$(flash "$bin_dir/rw")
rw_repair=$(flash "$bin_dir/rw-repair")
rw_snapshots=$(flash "$bin_dir/rw-snapshots")
ro_luks=$(flash "$bin_dir/ro-luks")
read -r img_luks _ _ _ _ <<<"$(ram_words "$bin_dir/ro-luks")"
ram_plain=$((img_plain + bounce))
ram_deflate=$((img_deflate + bounce + metadata + window + input))

waivers=budget-waivers.txt
status=0
check() { # name what value limit
    local name=$1 what=$2 value=$3 limit=$4 verdict reason
    reason=$(sed -n "s/^$name: //p" "$waivers" 2>/dev/null || true)
    if ((value <= limit)); then
        verdict=ok
        if [[ -n $reason ]]; then
            verdict="ok, but waived in $waivers: remove the waiver"
            status=1
        fi
    elif [[ -n $reason ]]; then
        verdict="OVER (waived: $reason)"
    else
        verdict=OVER
        status=1
    fi
    printf '%-13s %-58s %7d B  (limit %6d B)  %s\n' "$name" "$what" "$value" "$limit" "$verdict"
}

echo
echo "Budgets, thumbv7em-none-eabihf, opt-level z, LTO, panic=abort (DEPTH 2, 4 metadata slices of 512 B):"
printf '%-13s %-58s %7d B\n' info "flash: read-only engine, no decompressor (ro-plain)" "$ro_plain"
check flash-ro "flash: read-only engine with deflate (ro-deflate)" "$ro_deflate" $((32 * 1024))
check flash-rw "flash: read-write engine with deflate (rw)" "$rw" $((64 * 1024))
printf '%-13s %-58s %7d B\n' info "  (with dirty-repair, which links check::repair: rw-repair)" "$rw_repair"
printf '%-13s %-58s %7d B\n' info "  (with resize and snapshots create/apply/delete: rw-snapshots)" "$rw_snapshots"
printf '%-13s %-58s %7d B\n' info "flash: read-only engine with deflate and LUKS (ro-luks)" "$ro_luks"
printf '%-13s %-58s %7d B\n' info "  (its Image with the data keys; ro-deflate's: $img_deflate B)" "$img_luks"
check ram-plain "RAM, uncompressed read: Image $img_plain + bounce $bounce" "$ram_plain" $((8 * 1024))
printf '%-13s %-58s %7d B\n' info "  (plus the caller's metadata cache: 4 slices)" "$metadata"
check ram-deflate "RAM, compressed read: Image+inflate $img_deflate + buffers" "$ram_deflate" $((48 * 1024))
printf '%-13s %-58s\n' info "  (buffers: bounce $bounce, metadata $metadata, window $window, input $input)"
check stack-read "peak stack, Cortex-M run, read jobs" "$stack_read" $((8 * 1024))
check stack-write "peak stack, Cortex-M run, write jobs" "$stack_write" $((8 * 1024))

echo
for b in ro-deflate rw rw-repair rw-snapshots; do
    echo "Panic paths in $b:"
    reason=$(sed -n "s/^panic-$b: //p" "$waivers" 2>/dev/null || true)
    if python3 budget/panic_paths.py "$bin_dir/$b" budget/panic-allowlist.txt; then
        if [[ -n $reason ]]; then
            echo "panic-$b: passes, but waived in $waivers: remove the waiver"
            status=1
        fi
    elif [[ -n $reason ]]; then
        echo "panic-$b: FAILED (waived: $reason)"
    else
        status=1
    fi
done
echo "Panic paths in ro-luks (for information, not a budget):"
python3 budget/panic_paths.py "$bin_dir/ro-luks" budget/panic-allowlist.txt |
    grep -v "^  allowlisted" | sed 's/^panic-path check FAILED$/(sites outside the allowlist: see above)/' || true
cd "$root"
exit $status
