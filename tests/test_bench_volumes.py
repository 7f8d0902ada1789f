"""`sparse-fcmae bench --spatial-dims 3`: volumes through the same workers, the 3D dense family, the 3D FLOP
formula, and the memory fit (``--mem-budget-gb``). Small (atto, 64^3, batch 1-2, one step); no speed asserted."""
from __future__ import annotations

import json

import pytest
import torch
from _pretrain_run import _one_thread  # noqa: F401  (an autouse fixture: one thread)

from sparse_fcmae import bench, cli
from sparse_fcmae.bench.fit import largest_batch
from sparse_fcmae.masking import random_patch_mask

SMALL = ["--spatial-dims", "3", "--device", "cpu", "--sizes", "atto", "--decoder-dim", "32", "--mask-ratios", "0.6",
         "--modes", "train", "--executions", "eager", "--warmup", "0", "--steps", "1", "--no-progress"]


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 7, 8, 13, 64, 100])
@pytest.mark.parametrize("cap", [1, 8, 64])
def test_largest_batch_search_finds_the_threshold(limit, cap):
    """Against brute force: the largest batch <= cap that fits (fits = batch <= limit)."""
    tried = []

    def trial(b):
        tried.append(b)
        return {"batch": b, "fits": b <= limit, "peak_mem_mb": float(b), "error": None}

    best, trials = largest_batch(trial, cap)
    assert best == max([b for b in range(cap + 1) if b <= limit]) and len(set(tried)) == len(tried)
    assert [t["batch"] for t in trials] == tried and len(tried) <= 2 * cap.bit_length() + 1


def test_cli_3d_rows_and_memory_fit(tmp_path, capsys):
    out = tmp_path / "res"
    code = _run(["bench", *SMALL, "--layouts", "nchw", "--out", str(out), "--label", "v",
                 "--mem-budget-gb", "100", "--fit-max-batch", "2"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "v.json").read_text())
    bench.validate(result)
    s = result["settings"]
    assert (s["spatial_dims"], s["in_chans"], s["img_sizes"], s["batches"], s["sparse_layout"]) == (3, 1, [64], [2], "nchw")
    assert "ConvNeXtV2_3D" in result["variants"]["dense[nchw]"]["description"]
    (row,) = result["results"]
    assert row["img_size"] == 64 and row["visible_fraction"] == pytest.approx(3 / 8)  # int(8 x 0.4) patches of 2^3
    assert all(e["error"] is None and e["peak_mem_mb"] > 0 for e in row["variants"].values())
    (fit,) = result["fit"]
    assert fit["budget_mb"] == 100 * 1024 and set(fit["variants"]) == {"sparse", "dense_masked[nchw]", "dense[nchw]"}
    for name, v in fit["variants"].items():  # everything fits 100 GiB: batches 1 and 2 tried, 2 kept
        assert v["max_batch"] == 2 and [t["batch"] for t in v["trials"]] == [1, 2], name
        assert v["peak_mem_mb"] == v["trials"][1]["peak_mem_mb"] > v["trials"][0]["peak_mem_mb"] > 0
    assert fit["best_baseline"] == "dense_masked[nchw]" and fit["sparse_vs_best_baseline_batch"] == 1.0
    md = (out / "v.md").read_text()
    assert "## train, atto, batch 2, 64^3 voxels" in md and "sparse vol/s" in md
    assert "Memory fit: the largest training batch within 100 GiB" in md and (out / "v.png").is_file()
    # re-rendered from the JSON alone: the same tables
    assert _run(["bench", "--from-json", str(out / "v.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "v.md").read_text() == md


def test_fit_only_with_a_budget_nothing_fits(tmp_path, capsys):
    out = tmp_path / "res"
    code = _run(["bench", *SMALL, "--variants", "sparse,dense_masked", "--layouts", "nchw", "--out", str(out),
                 "--label", "f", "--fit-only", "--mem-budget-gb", "0.01", "--fit-max-batch", "4"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "f.json").read_text())
    assert result["results"] == [] and result["targets"] == []
    (fit,) = result["fit"]
    for v in fit["variants"].values():  # batch 1 already needs more than 10 MiB (the weights alone do)
        (t,) = v["trials"]
        assert v["max_batch"] == 0 and t["batch"] == 1 and not t["fits"] and t["peak_mem_mb"] > 0.01 * 1024
    assert fit["best_baseline"] is None and fit["sparse_vs_best_baseline_batch"] is None
    assert "| atto | 64^3 voxels | 0.60 | 0 | none fits | 0 |" in (out / "f.md").read_text()


def test_3d_variants_share_weights():
    """At mask ratio 0 the three families compute the same loss on volumes, in either layout."""
    opts = bench.BenchOptions(out=None, spatial_dims=3, in_chans=2, decoder_dim=32)
    state = bench.build_reference_state(opts, "atto")
    vols = torch.randn(2, 2, 64, 64, 64)  # 2 channels: with 1, NCDHW is channels_last_3d too
    mask = random_patch_mask(2, (2, 2, 2), 0.0)
    losses = {}
    for v in bench.VARIANTS:
        with torch.no_grad():
            losses[v] = bench.build_variant(v, "atto", state, vars(opts)).eval()(vols, mask)[0].item()
    assert losses["sparse"] == pytest.approx(losses["dense_masked"], rel=1e-4)
    assert losses["dense"] == pytest.approx(losses["dense_masked"], rel=1e-4)
    for layout in ("channels_last", "nchw"):
        config = bench.Config("dense_masked", layout)
        model, step = bench.prepare(config, bench.build_variant("dense_masked", "atto", state, vars(opts)),
                                    torch.device("cpu"))
        x = vols.contiguous(memory_format=config.tensor_format(3))
        assert x.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last") != x.is_contiguous()
        with torch.no_grad():
            assert step(x, mask)[0].item() == pytest.approx(losses["dense_masked"], rel=1e-5)


def test_3d_flop_formula_matches_flop_counter():
    """The 3D stem and stages counts equal torch's FlopCounterMode on the dense 3D encoder (the decoder's fast
    7^3 convolution skips taps that only read padding, so its nominal count is not what the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    opts = bench.BenchOptions(out=None, spatial_dims=3, in_chans=2, decoder_dim=32)
    batch, img = 1, 64
    net = bench.build_variant("dense", "atto", bench.build_reference_state(opts, "atto"), vars(opts)).encoder.model
    vols = torch.randn(batch, 2, img, img, img)
    with torch.no_grad():
        with FlopCounterMode(display=False) as stem_count:
            stem = net.stem(vols)
        with FlopCounterMode(display=False) as stages:
            net.stages(stem)
    fwd_total, fwd_stages = bench.count_flops(opts, "atto", batch, img, "forward")
    assert fwd_stages == pytest.approx(stages.get_total_flops() / 1e9, rel=1e-12)
    assert stem_count.get_total_flops() == 2 * batch * 2 * 64 * 40 * 16 ** 3  # 4^3 patches, 2 -> 40 channels
    train_total, train_stages = bench.count_flops(opts, "atto", batch, img, "train")
    assert train_stages == pytest.approx(3 * fwd_stages)
