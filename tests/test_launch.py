"""How a run is launched and logged: DDP (torchrun, SLURM variables), wandb offline, config errors, bf16."""

import pytest
import torch
from _pretrain_run import _assert_same_state, _cli, _main, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)
from omegaconf import OmegaConf

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.distributed import env_from_environment, first_slurm_host


def test_two_process_ddp_with_accumulation_matches_one_process(tmp_path):
    common = ["data.max_images=32", "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=2e-3", "resume=never"]
    one = _cli(f"run_dir={tmp_path / 'one'}", "data.batch_size=8", *common, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")  # a free port
    # 2 processes x batch 2 x accumulation 2 = global batch 8
    two = _cli(f"run_dir={tmp_path / 'two'}", "data.batch_size=2", "optim.accum_steps=2", *common, cwd=tmp_path,
               launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 2 x accum 2 x 2 proc = 8" in two.stdout
    assert "Grad strides do not match" not in two.stderr  # a harmless DDP warning, once printed by every rank
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint-last.pth"), load_checkpoint(tmp_path / "two" / "checkpoint-last.pth")
    assert a["global_step"] == b["global_step"] == 4
    # gradients are all-reduced in another order than one process sums them: float rounding (~1e-6)
    # that Adam's first steps amplify a little; a wrong shard, mask or loss scale moves weights by ~lr
    _assert_same_state(a["model"], b["model"], exact=False, rtol=0, atol=1e-5)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    # AdamW's weights are blind to a constant gradient scale; its moments are not: a missing 1/accum or a
    # sum instead of a mean across processes doubles exp_avg (and quadruples exp_avg_sq)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            scale = sa[key].abs().max()
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-3, atol=1e-4 * float(scale) + 1e-12)
    from sparse_fcmae.models import FCMAE

    torch.manual_seed(0)  # the runs' initial weights: training moved them far beyond the tolerance above
    fresh = FCMAE("atto", in_chans=1, decoder_dim=32).state_dict()
    assert all((a["model"][k] - fresh[k]).abs().max() > 1e-3 for k in ("pred.weight", "encoder.downsample_layers.1.1.kernel"))


def test_slurm_variables_are_honoured_when_torchrun_is_absent():
    env, extra = env_from_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                       "SLURM_NODELIST": "gpu[03-04,07]", "SLURM_JOB_ID": "12345"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert extra == {"MASTER_ADDR": "gpu03", "MASTER_PORT": str(20000 + 12345 % 20000)}
    env, extra = env_from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (env.rank, env.world_size, extra) == (1, 2, {})  # torchrun's variables win
    assert env_from_environment({})[0].world_size == 1
    assert first_slurm_host("node1,node2") == "node1" and first_slurm_host("a-b[9]") == "a-b9"


@pytest.mark.parametrize("override,needle", [
    ("optim.accum_steps=0", "accum_steps"), ("precision=fp8", "precision"), ("optim.warmup_epochs=9", "warmup_epochs"),
    ("optim.clip_grad=-1", "clip_grad"), ("optim.lr=-1", "lr"), ("checkpoint.keep_last=0", "keep_last"),
    ("data.img_size=0", "divisible by 32"), ("data.in_chans=0", "in_chans")])
def test_bad_config_values_are_rejected_with_the_key(override, needle):
    from sparse_fcmae.cli import compose
    from sparse_fcmae.training import validate_config

    cfg = compose("pretrain", [override])
    with pytest.raises(ValueError, match=needle):
        validate_config(cfg)


def test_digits_pretraining_with_wandb_offline_writes_run_files_and_panels(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config chooses offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    r = _main(f"run_dir={run}", "logger=wandb", "logger.mode=offline", "data.batch_size=8", "data.max_images=16",
              "optim.epochs=2", "panel_every=1", capfd=capfd)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((run / "wandb").iterdir())
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs == ["reconstruction-e0001.png", "reconstruction.png"]
    logged = list((runs[0] / "files" / "media" / "images").glob("reconstruction_*.png"))
    assert len(logged) == 2  # the panels were logged to wandb as well
    # the binary run log holds the scalar metrics by name
    blob = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/img_per_s", b"train/visible_fraction", b"train/memory_gb",
                b"mask_ratio"):  # ... and the run's config
        assert key in blob, key


def test_wandb_mode_environment_variable_wins(tmp_path, monkeypatch):
    from sparse_fcmae.logger import WandbLogger

    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "t", "mode": "offline", "entity": None}, "x": 1})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = WandbLogger(cfg, tmp_path)
    assert lg.mode == "disabled"
    lg.log({"a": 1.0}, step=1)
    lg.finish()
    assert not (tmp_path / "wandb").exists()


def test_bf16_autocast_runs_the_sparse_encoder():
    from sparse_fcmae.models import FCMAE

    model = FCMAE("atto", in_chans=3, decoder_dim=32)
    imgs = torch.randn(1, 3, 64, 64)
    mask = model.random_masking(imgs, torch.Generator().manual_seed(0))
    ref, _, _ = model(imgs, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same code path as CUDA autocast
        loss, pred, _ = model(imgs, mask)
    assert pred.dtype == torch.bfloat16 and abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
