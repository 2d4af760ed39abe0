#!/usr/bin/env python3
"""Lists the panic call sites in a release thumbv7em ELF and checks them against an allowlist.

usage: panic_paths.py ELF ALLOWLIST

A panic entry point is a function of `core` (or the panic handler) from which the call graph reaches
`core::panicking::*` or the panic handler; `core::panicking::*` themselves are entry points. A panic call
site is a call or tail call (bl, blx, b, b.w, cbz/cbnz are not calls) from any other function to an entry
point. Each site is attributed to the innermost frame of its inline chain (llvm-addr2line -i on the ELF's
line tables) that is not the standard library's own code: a bounds check of `copy_from_slice` inlined into
an engine function is the engine's; miniz_oxide's code inlined into an engine function is miniz_oxide's.
The crate is told by the source path (the workspace's `core/src` is `qcow2_core`).

Fails when a site belongs to `qcow2_core`, or to a function not in ALLOWLIST (`crate::function` per line,
as printed; lines starting with `#` are comments). Allowlisted functions without a site in this binary are noted.
"""

import re
import subprocess
import sys


def demangle(names):
    out = subprocess.run(["llvm-cxxfilt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return {n: clean(d) for n, d in zip(names, out)}


def strip_hash(name):
    return re.sub(r"::h[0-9a-f]{16}$", "", name)


def clean(name):
    """A function name as line tables give it, without hash or legacy-mangling escapes."""
    for a, b in (("_$LT$", "<"), ("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$C$", ","), ("$u5b$", "["),
                 ("$u5d$", "]"), ("$RF$", "&"), ("$BP$", "*"), ("..", "::")):
        name = name.replace(a, b)
    return strip_hash(name)


def drop_generics(name):
    """`a::f<T, U>` -> `a::f`: allowlist entries do not depend on the caller's types."""
    while name.endswith(">"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {">": 1, "<": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
        else:
            break
    return name


def crate_of(path):
    """The crate a source file belongs to: a registry crate's name, or the directory name of a path crate."""
    m = re.search(r"/registry/src/[^/]+/([A-Za-z0-9_-]+?)-[0-9][^/]*/", path)
    if m:
        return m.group(1).replace("-", "_")
    parts = path.split("/")
    if "src" in parts:
        root = parts[parts.index("src") - 1]
        return {"core": "qcow2_core"}.get(root, root.replace("-", "_"))
    return "?"


def main():
    elf, allow_path = sys.argv[1], sys.argv[2]
    dis = subprocess.run(["llvm-objdump", "-d", "--no-show-raw-insn", elf], capture_output=True, text=True,
                         check=True).stdout
    func_re = re.compile(r"^([0-9a-f]+) <(.+)>:$")
    call_re = re.compile(r"^\s*([0-9a-f]+):\s+(bl|blx|b|b\.w|b\.n)\s+0x[0-9a-f]+ <([^>+]+)>")
    calls = {}  # caller -> [(addr, callee)]
    cur = None
    for line in dis.splitlines():
        m = func_re.match(line)
        if m:
            cur = m.group(2)
            calls.setdefault(cur, [])
            continue
        m = call_re.match(line)
        if m and cur is not None and m.group(3) != cur:
            calls[cur].append((int(m.group(1), 16), m.group(3)))
    names = sorted(set(calls) | {c for v in calls.values() for _, c in v})
    dem = demangle(names)

    def is_core(sym):
        d = dem.get(sym, sym)
        if d.startswith("core::ptr::drop_in_place"):
            return False  # a destructor: holds the dropped type's code, attributed below by its lines
        if re.match(r"<(\[|str|char|bool|[ui](8|16|32|64|128|size)\b)", d):
            return True  # an inherent method of a primitive type: core's
        return d.startswith(("core::", "<core::", "compiler_builtins::")) or sym == "rust_begin_unwind"

    entry = {s for s in names if dem.get(s, s).startswith("core::panicking::") or s == "rust_begin_unwind"}
    changed = True
    while changed:
        changed = False
        for f, cs in calls.items():
            if f not in entry and is_core(f) and any(c in entry for _, c in cs):
                entry.add(f)
                changed = True

    sites = [(addr, f, c) for f, cs in calls.items() if f not in entry for addr, c in cs if c in entry]
    owners = {}
    for addr, f, c in sites:
        lines = subprocess.run(["llvm-addr2line", "-f", "-i", "-C", "-e", elf, hex(addr)],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        frames = list(zip(lines[0::2], lines[1::2]))
        owner = None
        for func, loc in frames:
            path = loc.rsplit(":", 2)[0]
            if "/library/" in path or path.startswith("/rustc/") or path == "??":
                continue  # the standard library's own code, inlined: look further out
            crate, func = crate_of(path), drop_generics(clean(func))
            owner = func if func.startswith(crate + "::") else f"{crate}::{func}"
            break
        if owner is None:
            owner = f"?::{strip_hash(dem.get(f, f))}"
        owners.setdefault(owner, []).append((addr, dem.get(c, c)))

    allow = set()
    with open(allow_path) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                allow.add(line)

    bad = False
    print(f"panic entry points linked: {len(entry)}; call sites: {len(sites)}, in {len(owners)} functions")
    for owner in sorted(owners):
        n = len(owners[owner])
        kinds = sorted({strip_hash(c).split("::")[-1] for _, c in owners[owner]})
        if owner.startswith("qcow2_core::"):
            verdict = "ENGINE (not allowed)"
            bad = True
        elif owner in allow:
            verdict = "allowlisted"
        else:
            verdict = "NOT IN ALLOWLIST"
            bad = True
        print(f"  {verdict:22} {n:3} x {owner}  -> {', '.join(kinds)}")
    for stale in sorted(allow - set(owners)):
        print(f"  note: allowlisted but no panic site in this binary: {stale}")
    if bad:
        print("panic-path check FAILED", file=sys.stderr)
        sys.exit(1)
    print("panic-path check: no engine function calls a panic entry point")


if __name__ == "__main__":
    main()
