"""Running pretraining from the tests: through the real entry point (``python -m sparse_fcmae.cli pretrain``,
torchrun for DDP) or ``cli.main`` in-process, with tiny configs; one thread per process keeps them quick."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the subprocess runs get (OMP_NUM_THREADS=1): fast on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["data.img_size=64", "model.decoder_dim=32", "panels=2", "panel_every=0", "log_every=1"]


def _env(**extra):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    env.pop("SPARSE_FCMAE_DEBUG", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _cli(*args, cwd, env=None, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "sparse_fcmae.cli", "pretrain", *TINY, *args]
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _main(*args, capfd):
    """The entry point in this process (no interpreter start-up): ``sparse_fcmae.cli.main``."""
    from sparse_fcmae.cli import main

    capfd.readouterr()
    code = main(["pretrain", *TINY, *args])
    out, err = capfd.readouterr()
    return _Result(code, out, err)


def _error_line(r):
    # the progress bar (tqdm, on stderr) may precede the error; nothing else may
    lines = [ln for ln in r.stderr.strip().splitlines()
             if ln.strip() and not ln.startswith(("warning:", "pretrain:"))]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.returncode, r.stderr[-3000:])
    return lines[0]


def _assert_same_state(a: dict, b: dict, exact: bool, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)




def fake_scontrol(tmp_path: pathlib.Path, job: str = "4242") -> tuple[dict, pathlib.Path]:
    """``(env, record)``: SLURM's ``scontrol`` stood in for on PATH (the system boundary), recording its arguments
    in ``record``, and ``SLURM_JOB_ID=job``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=job), record
