"""finetune / linprobe under preemption, through the CLI: SIGTERM/SIGUSR1 finishes the step, writes
checkpoint-last.pth with its position, says so in one line and exits 128 + signal; the same command resumes and
ends bit-identical to an uninterrupted run (weights, EMA, optimizer, per-epoch metrics). One run per run folder;
defaults come from the YAML; no MinkowskiEngine needed."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from _pretrain_run import ROOT, _env, fake_scontrol
from omegaconf import OmegaConf

from sparse_fcmae.checkpoint import load_checkpoint, save_checkpoint
from sparse_fcmae.cli import compose, main

# digits at 64 px, batch 8 of 160 images: 20 steps per epoch (a few seconds each on one thread)
SMALL = ["data.img_size=64", "data.batch_size=8", "data.max_images=160", "data.max_test_images=32",
         "optim.warmup_epochs=1", "data.num_workers=0"]
MODES = {
    # drop path (torch RNG), Mixup (numpy RNG) and EMA: every piece of state a resume must carry
    "finetune": ["optim.epochs=3", "ema.enabled=true", "aug.mixup=0.8", "aug.cutmix=1.0"],
    # the head trains on cached features: steps are fast, so more epochs keep the stop away from the end
    "linprobe": ["optim.epochs=30"],
}


def _cmd(mode, run, *extra):
    return [sys.executable, "-m", "sparse_fcmae.cli", mode, *SMALL, *MODES[mode], f"run_dir={run}", *extra]


def _run(mode, run, *extra, env=None):
    return subprocess.run(_cmd(mode, run, *extra), cwd=run.parent, env=env or _env(), capture_output=True, text=True,
                          timeout=900)


def _signalled(mode, run, *extra, env=None, signum=signal.SIGTERM):
    """Start a run, signal it once its first epoch's checkpoint is on disk; ``(exit code, stderr)``."""
    proc = subprocess.Popen(_cmd(mode, run, *extra), cwd=run.parent, env=env or _env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run / "checkpoint-last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # into epoch 2: a fine-tuning step takes longer than 0.3 s, an epoch far longer; a probe's epoch is quick
    time.sleep(0.3 if mode == "finetune" else 0.05)
    proc.send_signal(signum)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, "must stop within 60 s of the signal"
    return proc.returncode, err


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_sigterm_stops_after_the_step_and_the_same_command_resumes_bit_identical(mode, tmp_path):
    ref = _run(mode, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "stopped"
    code, err = _signalled(mode, run)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"[{mode}] stopped by SIGTERM after step" in lines[0], err[-3000:]
    assert f"{run / 'checkpoint-last.pth'} written; run the same command again to resume" in lines[0]
    step = int(re.search(r"after step (\d+)", lines[0]).group(1))
    stopped = load_checkpoint(run / "checkpoint-last.pth")
    per_epoch = 20
    assert stopped["global_step"] == step and per_epoch <= step < int(MODES[mode][0].split("=")[1]) * per_epoch
    if mode == "finetune":  # the stop lands inside an epoch: the resumed one must skip what it trained on
        assert stopped["progress"]["micro"] > 0, stopped["progress"]
    assert not (run / "results.json").exists()

    resumed = _run(mode, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[{mode}] resuming from {run / 'checkpoint-last.pth'}" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint-last.pth"), load_checkpoint(run / "checkpoint-last.pth")
    for key in ("model", "model_ema") if mode == "finetune" else ("model",):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "ref", run))
    assert ra["history"] == rb["history"] and len(ra["history"]) == int(MODES[mode][0].split("=")[1])
    assert ra["top1"] == rb["top1"]


def test_sigusr1_with_requeue_calls_scontrol(tmp_path):
    """requeue=true under SLURM: after the checkpoint, ``scontrol requeue $SLURM_JOB_ID`` (a stand-in scontrol on
    PATH records its arguments)."""
    env, record = fake_scontrol(tmp_path)
    run = tmp_path / "run"
    code, err = _signalled("finetune", run, "requeue=true", env=env, signum=signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    line = [ln for ln in err.splitlines() if ln.strip()]
    assert len(line) == 1 and "[finetune] stopped by SIGUSR1" in line[0] and "requeued SLURM job 4242" in line[0]
    assert load_checkpoint(run / "checkpoint-last.pth")["global_step"] > 20


def test_one_finetune_per_run_dir(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd("finetune", run), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (run / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # config.yaml is written once the lock is held
        first.send_signal(signal.SIGSTOP)  # paused mid-run, lock held
        assert first.poll() is None, "the first run ended before it was seen running"
        config = (run / "config.yaml").read_bytes()
        second = _run("linprobe", run)
        lines = [ln for ln in second.stderr.strip().splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert f"is in use by another finetune (pid {first.pid})" in lines[0], lines
        assert (run / "config.yaml").read_bytes() == config  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


QUICK = ["data.img_size=64", "data.batch_size=16", "data.max_images=16", "data.max_test_images=16", "optim.epochs=1",
         "optim.warmup_epochs=0"]


def test_a_run_folder_of_another_mode_or_version_is_refused(tmp_path, capfd):
    """Resuming needs a checkpoint of the same mode that holds a position; the refusal writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    model = {"w": torch.zeros(1)}
    cases = [({"model": model, "config": {"model": {"name": "atto"}}}, "is not a finetune checkpoint (it was written by pretrain)"),
             ({"model": model, "epoch": 0, "config": {"mode": "finetune"}}, "holds no training position"),
             ({"model": model, "optimizer": {}, "progress": {}, "config": {"mode": "finetune", "model": {"name": "tiny"}}},
              "was trained with model.name=tiny, this run asks for atto")]
    for ckpt, needle in cases:
        save_checkpoint(ckpt, run / "checkpoint-last.pth")
        capfd.readouterr()
        assert main(["finetune", *QUICK, f"run_dir={run}"]) == 2
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
        assert not (run / "config.yaml").exists()
    assert main(["finetune", *QUICK, f"run_dir={run}", "resume=never"]) == 0  # a fresh start is still possible


def test_a_partial_config_takes_its_defaults_from_the_mode_s_yaml(tmp_path, capfd):
    """conf/finetune.yaml and conf/linprobe.yaml are the one source of defaults: a config written by hand (or by an
    older version) runs, gaining the keys it lacks from its own mode's YAML (linprobe's blr 0.1, not finetune's)."""
    from sparse_fcmae.finetune import finetune

    full = compose("linprobe", [*QUICK, f"run_dir={tmp_path / 'lp'}"])
    partial = OmegaConf.to_container(full)
    for key in ("aug", "ema", "resume", "requeue", "split_seed"):
        del partial[key]
    for key in ("blr", "clip_grad", "label_smoothing"):
        del partial["optim"][key]
    del partial["data"]["val_root"], partial["data"]["split"]
    capfd.readouterr()
    result = finetune(OmegaConf.create(partial))
    out = capfd.readouterr().out
    assert f"lr {0.1 * 16 / 256:.2e}" in out and len(result["history"]) == 1
    saved = OmegaConf.load(tmp_path / "lp" / "config.yaml")
    assert saved == full  # every key back, with the YAML's values


def test_finetune_imports_and_runs_without_minkowski_engine(tmp_path):
    """A linear probe from scratch never loads MinkowskiEngine or the sparse model (installed here all the same)."""
    code = ("import sys\n"
            "from sparse_fcmae.cli import main\n"
            f"code = main(['linprobe', *{QUICK!r}, 'run_dir={tmp_path / 'lp'}'])\n"
            "print('loaded:', sorted(m for m in sys.modules if m.startswith(('MinkowskiEngine', 'sparse_fcmae.models'))))\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "lp" / "results.json").is_file()


def _children(pid: int) -> list[int]:
    return [int(c) for t in os.listdir(f"/proc/{pid}/task") for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


def test_a_killed_run_s_loader_workers_do_not_keep_its_run_dir_locked(tmp_path):
    """kill -9 of a run whose DataLoader workers live on (stopped here; they exit seconds later on their own): the
    same command resumes at once. An flock would be shared with the forked workers and refuse it."""
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd("finetune", run, "data.num_workers=2"), cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 600
        while not (run / "checkpoint-last.pth").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        while len(workers) < 2 and first.poll() is None and time.time() < deadline:  # epoch 2's workers
            workers = _children(first.pid)
            time.sleep(0.01)
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert workers, "the run ended before its workers were seen"
        again = _run("finetune", run, "data.num_workers=2", "optim.epochs=2")
        assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    finally:
        first.kill()
        first.wait()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
