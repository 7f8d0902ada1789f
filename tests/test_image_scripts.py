"""The image build's static parts: what each Dockerfile layer copies, .dockerignore, the scripts' bad input.

The build itself takes about an hour (scripts/build_image.sh, not in CI); these catch the mistakes that
would only show up there, in a second.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _deps_layer_copies() -> set[str]:
    """Files COPY'd before the RUN that installs the dependencies with SPARSE_FCMAE_DEPS_ONLY=1."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    head = text[: text.index("SPARSE_FCMAE_DEPS_ONLY=1")]
    copied = set()
    for line in head.splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    return copied


def test_the_dependency_layer_copies_every_script_it_runs():
    """setup_env.sh with SPARSE_FCMAE_DEPS_ONLY=1 runs before `COPY . .`: each file it (transitively) uses
    must be copied in that layer, or the image build fails an hour in."""
    copied = _deps_layer_copies()
    needed, todo = {"scripts/setup_env.sh", "requirements.txt"}, ["scripts/setup_env.sh"]
    while todo:
        src = (ROOT / todo.pop()).read_text()
        found = set(re.findall(r"scripts/[\w.]+\.(?:sh|py)", src)) | set(re.findall(r"\b[\w]+\.txt\b", src))
        found |= {f"scripts/{m}.py" for m in re.findall(r"from (patch_\w+) import", src)}
        for f in sorted(found - needed):
            if (ROOT / f).is_file():
                needed.add(f)
                todo.append(f)
    missing = sorted(f for f in needed if f not in copied)
    assert not missing, f"Dockerfile: copy {missing} before the dependency RUN"


def test_dockerignore_keeps_local_state_out():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for name in (".git", ".venv", "runs", "outputs", "wandb", ".gpu_carry", "benchmarks/results", "*.so", "build"):
        assert name in ignored, name


def _run(*cmd, env=None):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)


def test_build_image_rejects_bad_options_in_one_line():
    r = _run("bash", "scripts/build_image.sh", "--bogus")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown option --bogus (see --help)"
    r = _run("bash", "scripts/build_image.sh", "--commit", "no-such-revision")
    assert r.returncode == 2 and r.stderr.strip() == "error: no such commit: no-such-revision"
    r = _run("bash", "scripts/build_image.sh", "--context")
    assert r.returncode == 2 and r.stderr.strip() == "error: --context needs a folder"


def test_smoke_image_rejects_a_bad_user():
    r = _run("bash", "scripts/smoke_image.sh", env={**os.environ, "SMOKE_USER": "alice"})
    assert r.returncode == 2 and r.stderr.strip() == "error: SMOKE_USER must be uid:gid, got 'alice'"
