"""The package's shape: imports point down the data flow, and no module grows past 400 lines.

The layers, lowest first (a module may import its own layer's and lower layers' modules only):"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sparse_fcmae"
LAYERS = [
    {"checkpoint", "config", "distributed", "logger", "optim", "preemption", "_C", "__version__"},  # plumbing
    {"data", "masking"},  # image (or volume) -> mask
    {"ops"},  # kernels and their references
    {"sparse", "machine"},  # ME tensors and tables (machine: reports the kernels' build)
    {"models"},  # encoders, FCMAE
    {"visualize", "convert"},  # panels; weights between layouts
    {"training"},  # pretraining: loop, checkpoint state, schedule (shared with fine-tuning)
    {"finetune", "bench"},
    {"cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports(path: pathlib.Path) -> set[str]:
    """The top-level sparse_fcmae parts a module imports (anywhere in it, lazy imports included)."""
    rel = path.relative_to(ROOT.parent).with_suffix("").parts
    pkg = rel if path.name == "__init__.py" else rel[:-1]
    pkg = pkg[:-1] if pkg and pkg[-1] == "__init__" else pkg
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            target = base + (node.module.split(".") if node.module else [])
            targets = [target + [a.name] for a in node.names] if len(target) == 1 else [target]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names]
        else:
            continue
        out |= {t[1] for t in targets if len(t) > 1 and t[0] == "sparse_fcmae"}
    return out


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


def test_every_part_has_a_layer():
    parts = {_part(p) for p in MODULES}
    assert parts <= set(LAYER), f"give these a layer in LAYERS: {sorted(parts - set(LAYER))}"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_imports_point_down(path):
    own = LAYER[_part(path)]
    up = sorted(t for t in _imports(path) if t in LAYER and LAYER[t] > own)
    assert not up, f"{path.relative_to(ROOT)} (layer {own}) imports {up} from above it"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
