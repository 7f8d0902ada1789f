"""docs/errors.md is the list of every refusal a user can meet: each row with a command is run here as written
(one ``error:`` line, the documented exit code and message, nothing written); each other row names the test
that covers it, which must exist. The doc and the code cannot drift apart."""
import json
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _pretrain_run import _env, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)

from sparse_fcmae.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
OFFICIAL = ROOT / "tests" / "fixtures" / "official_fcmae_atto.pth"


def _rows() -> list[dict]:
    rows, section = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) != 4 or cells[0] == "What you did":
            continue
        command = re.fullmatch(r"`(sparse-fcmae(?: .*)?)`", cells[0])
        message = re.match(r"`([^`]+)`", cells[1])
        assert message, line
        rows.append({"section": section, "command": command.group(1) if command else None, "what": cells[0],
                     "message": message.group(1), "exit": int(re.search(r"\d+", cells[2]).group()), "test": cells[3]})
    return rows


ROWS = _rows()
ROW_LIMIT_S = 60
RUNNABLE = [r for r in ROWS if r["command"]]
COVERED_ELSEWHERE = [r for r in ROWS if not r["command"]]


def _png(path: pathlib.Path, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8), "L").save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
    """The files the documented commands name, in one folder (the commands' working directory)."""
    d = tmp_path_factory.mktemp("errors")
    shutil.copy(OFFICIAL, d / "official.pth")
    raw = OFFICIAL.read_bytes()
    (d / "garbage.pth").write_text("not a checkpoint\n")
    (d / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    torch.save([1, 2, 3], d / "list.pth")
    torch.save({"model": {"stem.weight": "not a tensor"}}, d / "empty.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, d / "resnet.pth")
    ckpt = torch.load(OFFICIAL, map_location="cpu", weights_only=False)
    del ckpt["model"]["encoder.stages.2.3.pwconv1.linear.weight"]
    torch.save(ckpt, d / "missing-key.pth")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(64, 64)}, str(d / "good.safetensors"))
    (d / "truncated.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:-1000])
    (d / "good.safetensors").unlink()
    from test_volumes_convert import _checkpoint

    (d / "vol").mkdir()
    _checkpoint(d / "vol", 1, 3)[0].rename(d / "vol3d.pth")
    (d / "vol").rmdir()
    (d / "a-file").write_text("keep me\n")
    (d / "full").mkdir()
    (d / "full" / "other.txt").write_text("mine\n")
    (d / "outdir").mkdir()
    (d / "empty" / "cls").mkdir(parents=True)
    _png(d / "flat" / "a.png")
    for name in ("a.png", "b.png"):
        _png(d / "corrupt" / "cls" / name)
        (d / "corrupt" / "cls" / name).write_bytes(b"not an image")
    (d / "npy" / "cls").mkdir(parents=True)
    np.save(d / "npy" / "cls" / "a.npy", np.zeros((4, 32, 4), np.float32))
    for i in range(2):
        _png(d / "one-class" / "cls" / f"{i}.png", i)
        for cls in ("a", "b"):
            _png(d / "classes" / cls / f"{i}.png", i)
        for cls in ("c", "d"):
            _png(d / "other-classes" / cls / f"{i}.png", i)
    from test_webdataset import _id_shards

    _id_shards(d / "shards", shards=1, per_shard=2)
    (d / "shards" / "ids-00.tar").rename(d / "good.tar")
    (d / "shards").rmdir()
    import webdataset as wds

    with wds.TarWriter(str(d / "corrupt.tar")) as w:
        for i in range(2):
            w.write({"__key__": f"bad{i}", "png": b"not an image"})
    png = _first_png(d / "good.tar")
    for name, labels in (("labelled.tar", (0, 1)), ("out-of-range.tar", (5,))):
        with wds.TarWriter(str(d / name)) as w:
            for i, y in enumerate(labels):
                w.write({"__key__": f"s{i}", "png": png, "cls": y})
    import nibabel as nib  # volumes (data=volumes)

    for folder in ("vols", "vols-mixed", "vols-mixed/cls", "vols-corrupt", "vols-amb"):
        (d / folder).mkdir()
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), str(d / "vols" / "a.nii.gz"))
    for path in ("vols-mixed/a.npy", "vols-mixed/cls/b.npy"):
        np.save(d / path, np.zeros((32, 32, 32), np.float32))
    (d / "vols-corrupt" / "a.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    (d / "vols-corrupt" / "b.npy").write_bytes(b"not an array")
    np.save(d / "vols-amb" / "a.npy", np.zeros((3, 4, 4, 3), np.float32))
    for cls in ("a", "b"):  # labelled volumes (finetune)
        (d / "vol-classes" / cls).mkdir(parents=True)
        np.save(d / "vol-classes" / cls / "x.npy", np.zeros((32, 32, 32), np.float32))
    (d / "foreign.json").write_text(json.dumps({"schema": "something-else"}))
    (d / "broken.json").write_text("{not json")
    return d


def _first_png(tar: pathlib.Path) -> bytes:
    import tarfile

    with tarfile.open(tar) as t:
        return t.extractfile(next(m for m in t.getmembers() if m.name.endswith(".png"))).read()


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_the_doc_has_a_table_for_every_command():
    assert {r["section"] for r in ROWS} == {"Any command", "pretrain", "finetune and linprobe", "convert", "bench", "bench-data"}
    assert len(RUNNABLE) > 80, len(RUNNABLE)


@pytest.mark.parametrize("row", RUNNABLE, ids=[r["command"].removeprefix("sparse-fcmae").strip() or "(none)" for r in RUNNABLE])
def test_documented_error_is_what_the_cli_says(row, files, capfd, monkeypatch):
    monkeypatch.chdir(files)
    for var in ("SPARSE_FCMAE_DEBUG", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    before = _listing(files)
    capfd.readouterr()
    def too_long(*_):  # a check gone missing would start a whole training: stop it, the row fails below
        raise TimeoutError(f"still running after {ROW_LIMIT_S} s instead of refusing")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(ROW_LIMIT_S)
    try:
        code = main(shlex.split(row["command"])[1:])
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert (code, len(lines)) == (row["exit"], 1), (code, err[-2000:])
    assert lines[0].startswith("error: ") and row["message"] in lines[0], (row["message"], lines[0])
    assert _listing(files) == before  # refused before anything was written


@pytest.mark.parametrize("row", COVERED_ELSEWHERE, ids=[r["what"][:60] for r in COVERED_ELSEWHERE])
def test_each_other_row_names_a_test_that_exists(row):
    if row["test"].startswith("none yet: "):  # said openly in the doc; this one list stays short
        assert sum(r["test"].startswith("none yet") for r in COVERED_ELSEWHERE) <= 1
        return
    m = re.fullmatch(r"(tests/\w+\.py)::(\w+)", row["test"])
    assert m, f"{row['what']}: the Test cell must name tests/<file>.py::<test>"
    assert re.search(rf"^def {m.group(2)}\(", (ROOT / m.group(1)).read_text(), re.M), row["test"]


# ---- the paths the table cannot run in-process ---------------------------------------------------

def test_ctrl_c_is_one_line_exit_130(tmp_path):
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "pretrain", "data.img_size=64", "data.batch_size=4",
           f"run_dir={tmp_path / 'run'}", "checkpoint.every_steps=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("pretrain:")]  # tqdm's bar
    assert proc.returncode == 130 and lines == ["interrupted"], err[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capfd):
    capfd.readouterr()
    assert main(["pretrain", "device=cuda", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: device=cuda but torch sees no GPU"] and not (tmp_path / "run").exists()


def test_finetune_nan_loss_is_one_line(tmp_path, capfd):
    capfd.readouterr()
    code = main(["finetune", "data.img_size=64", "data.batch_size=8", "data.max_images=16", "data.max_test_images=8",
                 "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=1e30", "data.num_workers=0",
                 f"run_dir={tmp_path / 'run'}"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "loss is" in lines[0] and "stopping" in lines[0], lines


def test_to_hf_without_transformers_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is absent
    capfd.readouterr()
    assert main(["convert", str(OFFICIAL), "--to", "hf", "-o", str(tmp_path / "hf")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--to hf needs transformers" in err[0] and not (tmp_path / "hf").exists()

