"""The numbers in README.md and docs/ are rendered from the committed result files, not typed by hand."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rendered_blocks_are_up_to_date(capsys):
    assert _renderer().main(["--check"]) == 0, capsys.readouterr().err


def test_a_hand_edited_number_is_caught(tmp_path):
    """Change one digit inside a rendered block: the renderer puts the measured value back."""
    mod = _renderer()
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- render headline")
    row = text.index("| `gpu-h100-search-fp32-2026-11-27.json`", start)
    edited = text[:row] + text[row:].replace("**2.02x**", "**2.52x**", 1)
    assert edited != text and mod.render(edited, "README.md") == text


def test_every_linked_result_file_exists():
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"<!-- render \S+ ([^>]*?) -->", doc.read_text()):
            for p in path.split():
                assert (ROOT / p).is_file(), (doc.name, p)
