#!/usr/bin/env python3
"""Patch the stock MinkowskiEngine 0.5.4 source release for today's Python, PyTorch and CUDA.

Usage: patch_minkowski.py SRC_DIR [--cuda]

Every edit names the text it expects; if the release differs (a new version, a re-run on patched
sources), the script stops with a clear message instead of building something half-patched.
Re-running on an already patched tree is a no-op for edits whose result is already present.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys


class PatchError(RuntimeError):
    pass


def replace(root: pathlib.Path, rel: str, old: str, new: str, count: int | None = None) -> None:
    """Replace `old` by `new` in `rel`; `count` (if given) is how many occurrences must exist."""
    path = root / rel
    text = path.read_text()
    n = text.count(old)
    if n == 0:
        if new and new in text:
            return  # already applied
        raise PatchError(f"{rel}: expected text not found: {old.strip()[:80]!r}")
    if count is not None and n != count:
        raise PatchError(f"{rel}: expected {count} occurrence(s) of {old.strip()[:60]!r}, found {n}")
    path.write_text(text.replace(old, new))


def fix_collections_abc(root: pathlib.Path) -> int:
    """`collections.Sequence` and friends moved to `collections.abc` (removed in Python 3.10)."""
    pattern = re.compile(r"^(\s*)from collections import ([^\n]*)$", re.M)
    abc_names = {"Sequence", "Mapping", "Iterable", "MutableMapping", "Callable", "Sized"}
    changed = 0
    for path in sorted((root / "MinkowskiEngine").rglob("*.py")):
        text = path.read_text()

        def repl(m: re.Match) -> str:
            names = [n.strip() for n in m.group(2).split(",")]
            abc = [n for n in names if n in abc_names]
            rest = [n for n in names if n not in abc_names]
            if not abc:
                return m.group(0)
            lines = [f"{m.group(1)}from collections.abc import {', '.join(abc)}"]
            if rest:
                lines.append(f"{m.group(1)}from collections import {', '.join(rest)}")
            return "\n".join(lines)

        new = pattern.sub(repl, text)
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def patch_setup(root: pathlib.Path) -> None:
    # setup.py uninstalls MinkowskiEngine with whatever `pip` is first on PATH, which may belong to
    # another environment; the wheel install replaces the old version anyway.
    replace(root, "setup.py", 'run_command("pip", "uninstall", "MinkowskiEngine", "-y")', "pass  # sparse-fcmae: no pip uninstall")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=pathlib.Path)
    ap.add_argument("--cuda", action="store_true", help="also apply the CUDA 13 / torch 2.14 fixes")
    args = ap.parse_args(argv)
    root = args.src
    if not (root / "setup.py").is_file() or not (root / "MinkowskiEngine").is_dir():
        print(f"error: {root} is not a MinkowskiEngine source tree", file=sys.stderr)
        return 2
    try:
        n = fix_collections_abc(root)
        patch_setup(root)
        if args.cuda:
            from patch_minkowski_cuda import patch_cuda  # noqa: PLC0415 (kept apart: CUDA-only)

            patch_cuda(root, replace)
    except PatchError as e:
        print(f"error: cannot patch MinkowskiEngine: {e}", file=sys.stderr)
        return 1
    print(f"[minkowski] patched {root.name}: collections.abc in {n} file(s){', CUDA fixes' if args.cuda else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
