#!/usr/bin/env bash
# The private apt sources list `.ci/run` installs the bookworm-backports emulators from, derived from the
# machine's own apt configuration: the archive the machine already gets Debian from (and its security
# archive), never a host named here.
#
# Sourced by .ci/run for `bookworm_sources_list`; run on its own it prints the list it would write:
#   bash .ci/apt-sources.sh [--dry-run] [APT_ETC]    (APT_ETC defaults to /etc/apt)
# and `bash .ci/apt-sources.sh --self-test` checks the parsing on made-up configurations.

# Prints every enabled `deb` entry of the apt configuration under $1 (an /etc/apt directory) as
# "URI<TAB>SUITE<TAB>SIGNED-BY" lines (SIGNED-BY is "-" when the entry names no keyring file). Reads
# sources.list and sources.list.d/*.list (one-line format) and sources.list.d/*.sources (deb822), the files
# apt reads; anything else in sources.list.d is ignored, as apt ignores it.
apt_deb_entries() {
    local etc=$1 f
    local one_line=() deb822=()
    [[ -f $etc/sources.list ]] && one_line+=("$etc/sources.list")
    for f in "$etc"/sources.list.d/*.list; do [[ -f $f ]] && one_line+=("$f"); done
    for f in "$etc"/sources.list.d/*.sources; do [[ -f $f ]] && deb822+=("$f"); done
    if ((${#one_line[@]})); then
        awk '
            { sub(/#.*/, "") }
            $1 != "deb" { next }
            {
                line = $0
                key = "-"
                # Options: [ key=value ... ], possibly with spaces inside the brackets.
                if (match(line, /\[[^]]*\]/)) {
                    opts = substr(line, RSTART + 1, RLENGTH - 2)
                    line = substr(line, 1, RSTART - 1) " " substr(line, RSTART + RLENGTH)
                    n = split(opts, o, /[ \t]+/)
                    for (i = 1; i <= n; i++)
                        if (tolower(o[i]) ~ /^signed-by=/) key = substr(o[i], 11)
                }
                n = split(line, w, /[ \t]+/)
                k = 0
                for (i = 1; i <= n; i++) if (w[i] != "") v[++k] = w[i]
                if (k >= 3) printf "%s\t%s\t%s\n", v[2], v[3], key
            }
        ' "${one_line[@]}"
    fi
    if ((${#deb822[@]})); then
        awk '
            function flush(   i, j, nu, ns, u, s, isdeb, nt, t) {
                if (types != "" && tolower(enabled) != "no") {
                    nt = split(types, t, /[ \t]+/)
                    isdeb = 0
                    for (i = 1; i <= nt; i++) if (t[i] == "deb") isdeb = 1
                    if (isdeb) {
                        nu = split(uris, u, /[ \t]+/)
                        ns = split(suites, s, /[ \t]+/)
                        for (i = 1; i <= nu; i++) {
                            if (u[i] == "") continue
                            for (j = 1; j <= ns; j++)
                                if (s[j] != "") printf "%s\t%s\t%s\n", u[i], s[j], (key ~ /^\// ? key : "-")
                        }
                    }
                }
                types = uris = suites = key = enabled = field = ""
            }
            FNR == 1 { flush() }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ {
                # A continuation line: more of the field above (an inline key block is not a file name).
                sub(/^[ \t]+/, "")
                if (field == "uris") uris = uris " " $0
                else if (field == "suites") suites = suites " " $0
                else if (field == "types") types = types " " $0
                else if (field == "signed-by") key = key " " $0
                next
            }
            {
                colon = index($0, ":")
                if (!colon) next
                field = tolower(substr($0, 1, colon - 1))
                value = substr($0, colon + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", value)
                if (field == "types") types = value
                else if (field == "uris") uris = value
                else if (field == "suites") suites = value
                else if (field == "signed-by") key = value
                else if (field == "enabled") enabled = value
            }
            END { flush() }
        ' "${deb822[@]}"
    fi
}

# Prints the private sources list for bookworm-backports, bookworm, bookworm-updates and bookworm-security,
# built from the URIs the apt configuration under $1 (default /etc/apt) already uses for Debian's bookworm
# suites and for its security suite. Fails (with a message) when it names no Debian bookworm archive.
bookworm_sources_list() {
    local etc=${1:-/etc/apt}
    local default_key=/usr/share/keyrings/debian-archive-keyring.gpg
    local uri suite key debian= debian_key= security= security_key= entries
    entries=$(apt_deb_entries "$etc") || return 1
    while IFS=$'\t' read -r uri suite key; do
        [[ -n $uri ]] || continue
        uri=${uri%/}
        case $suite in
        bookworm | bookworm-updates | bookworm-backports | bookworm-proposed-updates)
            [[ -n $debian ]] || { debian=$uri; debian_key=$key; } ;;
        bookworm-security | bookworm/updates)
            [[ -n $security ]] || { security=$uri; security_key=$key; } ;;
        esac
    done <<<"$entries"
    if [[ -z $debian ]]; then
        echo "no Debian bookworm archive in the apt configuration under $etc" >&2
        return 1
    fi
    [[ $debian_key == - || -z $debian_key ]] && debian_key=$default_key
    for suite in bookworm-backports bookworm bookworm-updates; do
        echo "deb [signed-by=$debian_key] $debian $suite main"
    done
    if [[ -n $security ]]; then
        [[ $security_key == - || -z $security_key ]] && security_key=$default_key
        echo "deb [signed-by=$security_key] $security bookworm-security main"
    fi
}

# Checks the parsing on made-up configurations (host names under .example, which no mirror has).
apt_sources_self_test() {
    local tmp fail=0 got want
    tmp=$(mktemp -d)
    # deb822: a disabled stanza, a deb-src one, a comment and a continuation line; a file apt does not read.
    mkdir -p "$tmp/a/sources.list.d"
    cat >"$tmp/a/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb deb-src
# a comment
URIs: http://archive.example/debian/
Suites: bookworm
 bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
EOF
    echo "deb http://wrong.example/debian bookworm main" >"$tmp/a/sources.list.d/old.list.disabled"
    want="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://archive.example/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://archive.example/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://archive.example/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://security.example/debian-security bookworm-security main"
    got=$(bookworm_sources_list "$tmp/a") || fail=1
    [[ $got == "$want" ]] || { printf 'deb822 case:\n%s\nwanted:\n%s\n' "$got" "$want" >&2; fail=1; }
    # One-line format with options, comments, another vendor's repository first, and no security entry.
    mkdir -p "$tmp/b/sources.list.d"
    cat >"$tmp/b/sources.list" <<'EOF'
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [ arch=amd64 signed-by=/etc/apt/keyrings/x.gpg ] https://vendor.example/apt nodistro main
deb [arch=amd64 signed-by=/etc/apt/keyrings/deb.gpg] http://archive.example/debian bookworm main # trailing
EOF
    echo "deb http://security.example/debian-security bookworm-security main" \
        >"$tmp/b/sources.list.d/security.list"
    want="deb [signed-by=/etc/apt/keyrings/deb.gpg] http://archive.example/debian bookworm-backports main
deb [signed-by=/etc/apt/keyrings/deb.gpg] http://archive.example/debian bookworm main
deb [signed-by=/etc/apt/keyrings/deb.gpg] http://archive.example/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://security.example/debian-security bookworm-security main"
    got=$(bookworm_sources_list "$tmp/b") || fail=1
    [[ $got == "$want" ]] || { printf 'one-line case:\n%s\nwanted:\n%s\n' "$got" "$want" >&2; fail=1; }
    # No Debian archive at all: a failure, not a made-up host.
    mkdir -p "$tmp/c"
    echo "deb https://vendor.example/apt nodistro main" >"$tmp/c/sources.list"
    if bookworm_sources_list "$tmp/c" >/dev/null 2>&1; then
        echo "a configuration without a Debian archive gave a sources list" >&2
        fail=1
    fi
    rm -rf "$tmp"
    return "$fail"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case ${1:-} in
    --self-test)
        apt_sources_self_test
        echo "apt sources parsing: ok"
        ;;
    --dry-run)
        bookworm_sources_list "${2:-/etc/apt}"
        ;;
    *)
        bookworm_sources_list "${1:-/etc/apt}"
        ;;
    esac
fi
