#!/usr/bin/env python3
"""The library's import graph, checked: rooms import downward only, and no two files import
each other in a circle (kernel files included, test modules included).

    python3 scripts/module_graph.py          # prints the room graph; exit 1 on a violation
    python3 scripts/module_graph.py --files  # also every file-level edge

Every `crate::a::b` and `super::…` path in the code (comments and string literals left out)
of crates/quill/src is resolved to the file it names. Rooms are the top-level modules; ROOMS
lists them from the bottom up: a room may import only rooms listed before it.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "crates" / "quill" / "src"
# bottom first: each room may import only the rooms before it
ROOMS = ["error", "rng", "kernels", "tokenizer", "model", "chat", "io", "data", "sample",
         "explain", "train", "bench"]


def strip(text):
    """The code without comments, string and char literals (so paths and braces in them
    do not count)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:i + 4])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path):
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return parts


def file_of(mod):
    """The file that defines module path `mod` (the longest prefix that is a file)."""
    for k in range(len(mod), 0, -1):
        p = SRC.joinpath(*mod[:k])
        for cand in (p.with_suffix(".rs"), p / "mod.rs"):
            if cand.is_file():
                return cand
    return None


def edges_of(path):
    code = strip(path.read_text())
    base = module_of(path)
    # inline modules (`mod tests { … }`): a `super` inside one refers to the file itself
    spans = []
    for m in re.finditer(r"\bmod\s+\w+\s*\{", code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        spans.append((m.start(), j))
    found = set()
    for m in re.finditer(r"\b(crate|super)((?:::super)*)::(\{[^}]*\}|[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*)", code):
        kind, supers, rest = m.group(1), m.group(2), m.group(3)
        inner = sum(1 for a, b in spans if a < m.start() < b)
        if kind == "crate":
            mod = []
        else:
            up = 1 + supers.count("super") - inner
            mod = base[:len(base) - up] if up > 0 else base[:]
        names = [x.strip().split("::")[0] for x in rest.strip("{}").split(",")] if rest.startswith("{") else [rest]
        for name in names:
            if not name or name in ("self", "*"):
                continue
            target = file_of(mod + name.split("::"))
            if target and target != path:
                found.add(target)
    # paths that start at a child module of this file's module (`use decoder::Model` in a
    # mod.rs), outside inline modules
    for m in re.finditer(r"(?<![\w:])([a-z_][a-z0-9_]*)::", code):
        if any(a < m.start() < b for a, b in spans):
            continue
        name = m.group(1)
        if name in ("crate", "super", "self", "std", "core", "alloc"):
            continue
        target = file_of(base + [name]) if (SRC.joinpath(*base, name + ".rs").is_file()
                                             or (SRC.joinpath(*base, name) / "mod.rs").is_file()) else None
        if target and target != path:
            found.add(target)
    return found


def room(path):
    parts = module_of(path)
    return parts[0] if parts else "lib"


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    files = sorted(p for p in SRC.rglob("*.rs") if p.name != "lib.rs")
    graph = {f: edges_of(f) for f in files}
    bad = 0
    rooms = {}
    for f, targets in graph.items():
        for t in targets:
            a, b = room(f), room(t)
            if a != b:
                rooms.setdefault(a, set()).add(b)
    print("rooms (bottom first) and what each imports:")
    for r in ROOMS:
        print(f"  {r:<10} -> {', '.join(sorted(rooms.get(r, ()))) or '-'}")
    for a, targets in sorted(rooms.items()):
        for b in sorted(targets):
            if a not in ROOMS or b not in ROOMS:
                print(f"UNLISTED room in edge {a} -> {b}")
                bad += 1
            elif ROOMS.index(b) > ROOMS.index(a):
                print(f"UPWARD import: {a} -> {b}")
                bad += 1
    for comp in cycles(graph):
        print("CIRCLE among files:", ", ".join(sorted(str(p.relative_to(SRC)) for p in comp)))
        bad += 1
    if "--files" in sys.argv:
        for f, targets in graph.items():
            for t in sorted(targets):
                print(f"  {f.relative_to(SRC)} -> {t.relative_to(SRC)}")
    print("ok: no upward import, no circle" if not bad else f"{bad} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
