#!/usr/bin/env bash
# Fetches Debian bookworm's qemu-utils 7.2 (qemu-img, qemu-io) into a cache directory, next to — never over —
# the installed qemu-utils 10: `apt-get download` + `dpkg-deb -x`, no dpkg install. Reuses the cache when it
# is already there. Checks that `qemu-img --version` says 7.2 and that every shared library resolves; a
# library the machine lacks is fetched the same way (its package unpacked into the cache) and named in
# QCOW2_QEMU_LIBS for the test harness, which adds it to LD_LIBRARY_PATH for QEMU's tools only.
#
# Usage: qemu72.sh [CACHE_DIR]   (default: $HOME/.cache/qcow2-ci/qemu-7.2)
# Log lines go to stderr. The last thing printed on stdout is the path of an env file to source; it sets
# QCOW2_QEMU_DIR (the directory holding qemu-img and qemu-io 7.2) and QCOW2_QEMU_LIBS (may be empty).
# Needs root (or sudo) only for `apt-get update`, run when apt knows no 7.2 version yet.
set -euo pipefail

cache=${1:-"${HOME:-/root}/.cache/qcow2-ci/qemu-7.2"}
root="$cache/root"
envfile="$cache/env"
log() { printf 'qemu72: %s\n' "$*" >&2; }
as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -E "$@"; fi
}

# The highest qemu-utils version apt knows whose upstream part is 7.2 (e.g. 1:7.2+dfsg-7+deb12u18+b2).
pick_version() {
    local best="" v
    while read -r v; do
        [[ $v =~ ^([0-9]+:)?7\.2[^0-9] ]] || continue
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done < <(apt-cache madison qemu-utils 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')
    printf '%s' "$best"
}

# Unpacks the .deb of package $1 (version $2, or the candidate when empty) into $root.
fetch_unpack() {
    local pkg=$1 ver=${2:-} tmp deb
    tmp=$(mktemp -d)
    chmod a+rwx "$tmp" # apt-get download drops root for the _apt user
    (cd "$tmp" && apt-get download -q "${pkg}${ver:+=$ver}" >&2)
    for deb in "$tmp"/*.deb; do
        log "unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$root"
    done
    rm -rf "$tmp"
}

# The shared libraries qemu-img or qemu-io cannot find (with the cache's library directories added).
missing_libs() {
    local b
    for b in "$root/usr/bin/qemu-img" "$root/usr/bin/qemu-io"; do
        LD_LIBRARY_PATH="${libs}${libs:+:}${LD_LIBRARY_PATH:-}" ldd "$b" | awk '/not found/ { print $1 }'
    done | sort -u
}

version_ok() {
    LD_LIBRARY_PATH="${libs}${libs:+:}${LD_LIBRARY_PATH:-}" "$root/usr/bin/qemu-img" --version 2>/dev/null |
        head -n1 | grep -q '^qemu-img version 7\.2[. ]'
}

libs=""
lib_dirs() {
    # the multiarch library directories present in the cache
    local d out=""
    for d in "$root"/lib/*-linux-gnu "$root"/usr/lib/*-linux-gnu "$root"/lib "$root"/usr/lib; do
        [[ -d $d ]] && compgen -G "$d/*.so*" >/dev/null && out="${out}${out:+:}$d"
    done
    printf '%s' "$out"
}

if [[ -x $root/usr/bin/qemu-img && -x $root/usr/bin/qemu-io && -f $envfile ]]; then
    # shellcheck disable=SC1090
    libs=$(. "$envfile" && printf '%s' "${QCOW2_QEMU_LIBS:-}")
    if version_ok && [[ -z $(missing_libs) ]]; then
        log "reusing $root"
        printf '%s\n' "$envfile"
        exit 0
    fi
    log "cache at $root is stale or broken: fetching again"
fi

rm -rf "$cache"
mkdir -p "$root"
version=$(pick_version)
if [[ -z $version ]]; then
    log "no qemu-utils 7.2 known to apt: apt-get update"
    as_root apt-get update -q >&2
    version=$(pick_version)
fi
[[ -n $version ]] || { log "apt offers no qemu-utils 7.2 (apt-cache madison qemu-utils)"; exit 1; }
log "qemu-utils $version"
fetch_unpack qemu-utils "$version"

# Libraries the machine lacks (none on Debian 12 with qemu-utils 10 installed, but a minimal machine may
# miss some): unpack every Depends package of this qemu-utils that is not installed, then check again.
if [[ -n $(missing_libs) ]]; then
    log "missing libraries: $(missing_libs | tr '\n' ' ')"
    while read -r pkg; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            fetch_unpack "$pkg"
        fi
    done < <(apt-cache depends "qemu-utils=$version" | awk '$1 == "Depends:" && $2 !~ /^</ { print $2 }' | sort -u)
    libs=$(lib_dirs)
    if [[ -n $(missing_libs) ]]; then
        log "still missing: $(missing_libs | tr '\n' ' ')"
        exit 1
    fi
fi
version_ok || {
    log "$root/usr/bin/qemu-img does not report version 7.2:"
    "$root/usr/bin/qemu-img" --version >&2 || true
    exit 1
}
"$root/usr/bin/qemu-io" --version >/dev/null
printf 'QCOW2_QEMU_DIR=%q\nQCOW2_QEMU_LIBS=%q\n' "$root/usr/bin" "$libs" >"$envfile"
log "ready: $("$root/usr/bin/qemu-img" --version | head -n1)"
printf '%s\n' "$envfile"
