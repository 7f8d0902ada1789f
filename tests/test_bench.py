"""`sparse-fcmae bench`: outputs, schema, the variants' shared weights, FLOP counting, bad options.

Small and fast (atto, 64 px, batch 2, one timed step); nothing here asserts a speed.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sparse_fcmae import bench, cli
from sparse_fcmae.masking import random_patch_mask


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse errors exit directly
        return e.code


def test_cli_writes_valid_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    ratios = [0.0, 0.6]
    code = _run(["bench", "--out", str(out), "--device", "cpu", "--sizes", "atto", "--batch", "2",
                 "--img-size", "64", "--mask-ratios", ",".join(map(str, ratios)), "--modes", "train",
                 "--layouts", "channels_last,nchw", "--executions", "eager",
                 "--warmup", "0", "--steps", "1", "--label", "t", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "t.json").read_text())
    bench.validate(result)
    assert result["schema"] == bench.SCHEMA_ID
    assert result["settings"]["device"] == "cpu" and result["machine"]["torch"] == torch.__version__
    configs = ["sparse", "dense_masked[cl]", "dense[cl]", "dense_masked[nchw]", "dense[nchw]"]
    assert list(result["variants"]) == configs
    assert result["variants"]["dense_masked[nchw]"]["layout"] == "nchw"
    rows = result["results"]
    assert [r["mask_ratio"] for r in rows] == ratios and {r["mode"] for r in rows} == {"train"}
    from sparse_fcmae.models import FCMAE

    weights_mb = sum(p.numel() for p in FCMAE(encoder="sparse", size="atto").parameters()) * 4 / 2**20
    for r in rows:
        v = r["variants"]
        assert set(v) == set(configs)
        for name, e in v.items():
            assert e["error"] is None, (name, e["error"])
            assert e["images_per_s"] == pytest.approx(2 / e["median_s"])
            assert e["peak_mem_mb"] > 0  # weights + AdamW state at least
            # the split: steady (held between steps; no warm-up step here, so the weights alone) + step = peak
            assert e["steady_mem_mb"] + e["step_mem_mb"] == pytest.approx(e["peak_mem_mb"])
            assert e["steady_mem_mb"] >= 0.9 * weights_mb and e["step_mem_mb"] > 0, (name, e, weights_mb)
        # the sparse step runs beside each group (channels_last, then nchw): one timed step in each
        sparse_t = v["sparse"]["step_times_s"]
        assert len(sparse_t) == 2 and all(len(e["step_times_s"]) == 1 for n, e in v.items() if n != "sparse")
        for group, names in enumerate((("dense_masked[cl]", "dense[cl]"), ("dense_masked[nchw]", "dense[nchw]"))):
            for n in names:  # one round: paired = that round's time ratio
                assert v[n]["sparse_speedup_paired"] == pytest.approx(v[n]["step_times_s"][0] / sparse_t[group])
        tp = {n: e["images_per_s"] for n, e in v.items()}
        best = max(("dense_masked[cl]", "dense_masked[nchw]"), key=tp.get)
        best_dense = max(("dense[cl]", "dense[nchw]"), key=tp.get)
        assert r["best_baseline"] == best and r["best_dense"] == best_dense
        q = r["ratios"]
        assert q["sparse_vs_best_baseline_throughput"] == pytest.approx(tp["sparse"] / tp[best])
        assert q["sparse_vs_best_baseline_throughput_paired"] == v[best]["sparse_speedup_paired"]
        assert q["sparse_vs_best_baseline_memory"] == pytest.approx(v["sparse"]["peak_mem_mb"] / v[best]["peak_mem_mb"])
        assert q["sparse_vs_best_dense_throughput"] == pytest.approx(tp["sparse"] / tp[best_dense])
    # 64 px = 2x2 patches: ratio 0 keeps 4, ratio 0.6 keeps int(4 * 0.4) = 1
    assert [r["visible_fraction"] for r in rows] == [1.0, 0.25]
    assert rows[0]["flops"]["limit_speedup"] == pytest.approx(1.0)
    assert rows[1]["flops"]["limit_speedup"] > 1.0
    md = (out / "t.md").read_text()
    assert "## train, atto, batch 2, 64 px" in md
    lead = [line for line in md.splitlines() if line.startswith("| 0.") and line.count("|") == 12]
    assert len(lead) == len(ratios) and lead[0].startswith("| 0.00 | 1.00 |") and f"| {rows[1]['best_baseline']} |" in lead[1]
    assert sum(line.startswith("| 0.60 | ") and line.count("|") == 9 for line in md.splitlines()) == len(configs)
    assert all(e["compiled_graphs"] == 0 for r in rows for e in r["variants"].values())  # eager: nothing compiled
    with Image.open(out / "t.png") as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300
    # re-rendering the JSON (as for results from a GPU machine) gives the same table
    assert _run(["bench", "--from-json", str(out / "t.json"), "--out", str(tmp_path / "r"), "--label", "r"]) == 0
    assert (tmp_path / "r" / "r.md").read_text() == md and (tmp_path / "r" / "r.png").is_file()
    assert not (tmp_path / "r" / "r.json").exists()  # a re-rendering writes no result file
    # without --out and --label: beside the JSON, under its own stem, the JSON itself untouched
    before = (out / "t.json").read_bytes()
    (out / "t.md").unlink()
    assert _run(["bench", "--from-json", str(out / "t.json")]) == 0
    assert (out / "t.md").read_text() == md and (out / "t.json").read_bytes() == before


def test_schema_1_results_still_render(tmp_path):
    """Results committed before the baseline search (schema 1) validate and render."""
    import pathlib

    old = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu-h100-2026-11-26.json"
    assert _run(["bench", "--from-json", str(old), "--out", str(tmp_path), "--label", "old"]) == 0
    md = (tmp_path / "old.md").read_text()
    train = md[md.index("## train"):]
    row = next(line for line in train.splitlines() if line.startswith("| 0.60 | 0.39 |"))
    assert "| 1111.5 | dense_masked | 461.5 | 2.41x (2.41x) | 0.31x | dense | 482.9 |" in row


def test_compiled_baseline_runs(tmp_path):
    """A torch.compile'd dense-masked configuration and the compiled sparse step (its graph path) are measured
    (inductor on CPU) and named as such."""
    out = tmp_path / "res"
    code = _run(["bench", "--out", str(out), "--device", "cpu", "--batch", "1", "--img-size", "64",
                 "--mask-ratios", "0.5", "--modes", "forward", "--variants", "sparse,dense_masked",
                 "--layouts", "channels_last", "--executions", "compiled", "--sparse-compile", "--warmup", "1",
                 "--steps", "1", "--no-progress"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["variants"]["dense_masked[cl,compiled]"]["compiled"] is True
    (row,) = result["results"]
    compiled = row["variants"]["dense_masked[cl,compiled]"]
    assert compiled["error"] is None and compiled["compiled_graphs"] >= 1  # torch.compile made a graph
    assert row["variants"]["sparse"]["compiled_graphs"] == 1  # --sparse-compile: the whole forward, one graph
    assert result["variants"]["sparse"]["compiled"] is True and result["settings"]["sparse_compile"] == "default"
    assert row["best_baseline"] == "dense_masked[cl,compiled]"


def test_time_budget_keeps_what_was_measured(tmp_path):
    out = tmp_path / "res"
    code = _run(["bench", "--out", str(out), "--device", "cpu", "--batch", "1", "--img-size", "32",
                 "--mask-ratios", "0,0.5", "--modes", "forward", "--variants", "dense_masked", "--warmup", "0",
                 "--steps", "1", "--time-budget", "0.001", "--no-progress"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    bench.validate(result)
    assert result["settings"]["stopped_early"] is True
    assert [r["mask_ratio"] for r in result["results"]] == [0.0]  # the first configuration, then stop
    assert "Stopped early" in (out / "bench.md").read_text()


def test_bf16_precision_runs_and_is_recorded(tmp_path):
    out = tmp_path / "res"
    code = _run(["bench", "--out", str(out), "--device", "cpu", "--batch", "2", "--img-size", "64",
                 "--mask-ratios", "0.5", "--modes", "train", "--variants", "sparse,dense_masked", "--warmup", "0",
                 "--steps", "1", "--precision", "bf16", "--executions", "eager", "--layouts", "nchw", "--no-progress"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    bench.validate(result)
    assert result["settings"]["dtype"].startswith("bfloat16")
    assert all(v["available"] for v in result["variants"].values())
    assert "bfloat16 autocast" in (out / "bench.md").read_text()


def test_validate_rejects_broken_results(tmp_path):
    good = {"schema": bench.SCHEMA_ID, "created": "x", "machine": {}, "settings": {}, "variants": {},
            "results": [], "targets": []}
    with pytest.raises(ValueError, match="missing 'platform'"):
        bench.validate(good)
    with pytest.raises(ValueError, match="schema"):
        bench.validate({**good, "schema": "other/1"})
    row = {"images_per_s": "fast", "median_s": None, "step_times_s": [], "peak_mem_mb": None, "error": None}
    with pytest.raises(ValueError, match="images_per_s"):
        bench.validate(row, bench._VARIANT_RESULT)


def test_variants_share_weights():
    """At mask ratio 0 all three variants compute the same loss: same weights, same decoder."""
    opts = bench.BenchOptions(out=None)
    state = bench.build_reference_state(opts, "atto")
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_patch_mask(2, (2, 2), 0.0)
    losses = {}
    for v in bench.VARIANTS:
        model = bench.build_variant(v, "atto", state, vars(opts)).eval()
        with torch.no_grad():
            losses[v] = model(imgs, mask)[0].item()
    assert losses["sparse"] == pytest.approx(losses["dense_masked"], rel=1e-4)
    assert losses["dense"] == pytest.approx(losses["dense_masked"], rel=1e-4)
    for layout in ("channels_last", "nchw"):  # the layout changes the memory order, not the result
        model, step = bench.prepare(bench.Config("dense_masked", layout), bench.build_variant(
            "dense_masked", "atto", state, vars(opts)), torch.device("cpu"))
        with torch.no_grad():
            assert step(imgs.contiguous(memory_format=bench.Config("dense", layout).memory_format), mask)[0].item() \
                == pytest.approx(losses["dense_masked"], rel=1e-5)


def test_flop_formula_matches_flop_counter():
    """The analytic forward count equals torch's FlopCounterMode on the dense model, in total and stages."""
    from torch.utils.flop_counter import FlopCounterMode

    opts = bench.BenchOptions(out=None, decoder_dim=64)
    batch, img = 2, 64
    model = bench.build_variant("dense", "atto", bench.build_reference_state(opts, "atto"), vars(opts))
    imgs = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        with FlopCounterMode(display=False) as total:
            model(imgs, random_patch_mask(batch, (2, 2), 0.6))
        stem = model.encoder.model.stem(imgs)
        with FlopCounterMode(display=False) as stages:
            model.encoder.model.stages(stem)
    fwd_total, fwd_stages = bench.count_flops(opts, "atto", batch, img, "forward")
    assert fwd_total == pytest.approx(total.get_total_flops() / 1e9, rel=1e-12)
    assert fwd_stages == pytest.approx(stages.get_total_flops() / 1e9, rel=1e-12)
    train_total, train_stages = bench.count_flops(opts, "atto", batch, img, "train")
    assert train_stages == pytest.approx(3 * fwd_stages) and 2.9 * fwd_total < train_total < 3 * fwd_total


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--mask-ratios", "0.5,1.0"], "--mask-ratios"),
        (["--sizes", "giant"], "giant"),
        (["--img-size", "100"], "100"),
        (["--batch", "0"], "--batch"),
        (["--modes", "fly"], "fly"),
        (["--steps", "abc"], "--steps"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--label", "../x"], "--label"),
        (["--precision", "fp16"], "fp16"),
        (["--layouts", "nhwc"], "nhwc"),
        (["--executions", "jit"], "jit"),
        (["--sparse-layout", "nhwc"], "--sparse-layout"),
        (["--sparse-compile", "fastest"], "--sparse-compile"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    out = tmp_path / "res"
    code = _run(["bench", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not out.exists()


def test_measuring_needs_out(capsys):
    assert _run(["bench", "--device", "cpu"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_from_json_rejects_foreign_json(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    assert _run(["bench", "--from-json", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a bench result" in err[0]
    assert not (tmp_path / "o").exists()


def test_missing_out_is_one_line(capsys):
    assert _run(["bench", "--sizes", "atto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--out" in err[0]


def test_gpu_profile_script_runs_on_cpu_and_labels_the_bookkeeping(tmp_path):
    """benchmarks/gpu_profile.py (run on GPU machines) on CPU: both variants timed, the sparse
    bookkeeping labelled (one table lookup per block, one child table per downsampling)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.txt"
    assert mod.main(["--device", "cpu", "--size", "atto", "--batch", "2", "--img-size", "64", "--steps", "2",
                     "--sweep", "", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    sparse = report["variants"]["sparse"]
    assert sparse["wall_ms_per_step"] > 0 and report["variants"]["dense_masked"]["wall_ms_per_step"] > 0
    labels = sparse["labels"]
    assert labels["neighbor_table"]["calls_per_step"] == 4  # one lookup per stage, not per block
    assert labels["sample_segments"]["calls_per_step"] == 4
    assert labels["child_table"]["calls_per_step"] == 3
    assert labels["to_sparse"]["calls_per_step"] == labels["densify"]["calls_per_step"] == 1
    assert "sparse" in out.read_text()


def test_bench_runs_where_the_gpu_image_lacks_hydra_and_matplotlib(tmp_path):
    """benchmarks/gpu_bench.sh runs `python -m sparse_fcmae.cli bench` in an image without omegaconf, hydra,
    wandb or matplotlib (tests/fixtures/gpu_image blocks them): it measures and writes JSON and markdown."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "tests" / "fixtures" / "gpu_image"), str(root)])}
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_fcmae.cli", "bench", "--device", "cpu", "--sizes", "atto", "--batch", "2",
         "--img-size", "64", "--mask-ratios", "0.6", "--modes", "train", "--variants", "sparse,dense_masked",
         "--layouts", "nchw", "--executions", "eager", "--warmup", "0", "--steps", "1", "--no-progress",
         "--out", str(tmp_path), "--label", "g"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blocked: GPU image stand-in" not in proc.stderr
    (row,) = json.loads((tmp_path / "g.json").read_text())["results"]
    assert {v.split("[")[0] for v in row["variants"]} == {"sparse", "dense_masked"}
    assert (tmp_path / "g.md").is_file() and not (tmp_path / "g.png").exists()
    assert "matplotlib is not installed" in proc.stderr


def test_sparse_graph_runs_the_graph_path_eagerly(tmp_path):
    """``--sparse-graph``: the sparse configuration on the encoder's graph path, not compiled, and named so."""
    from sparse_fcmae.bench.options import Config
    from sparse_fcmae.bench.variants import prepare
    from sparse_fcmae.models import FCMAE

    for graph, compiled in ((False, False), (True, False)):
        model, step = prepare(Config("sparse", "nchw", compiled, graph=graph), FCMAE("atto"), torch.device("cpu"))
        assert model.encoder.graph is graph and step is model
    out = tmp_path / "res"
    code = _run(["bench", "--out", str(out), "--device", "cpu", "--batch", "1", "--img-size", "64",
                 "--mask-ratios", "0.5", "--modes", "train", "--variants", "sparse,dense_masked", "--layouts", "nchw",
                 "--executions", "eager", "--sparse-graph", "--warmup", "1", "--steps", "1", "--no-progress"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    bench.validate(result)
    assert result["settings"]["sparse_graph"] is True and result["variants"]["sparse"]["graph"] is True
    assert "graph path, eager" in result["variants"]["sparse"]["description"]
    (row,) = result["results"]
    assert row["variants"]["sparse"]["error"] is None and row["variants"]["sparse"]["compiled_graphs"] == 0
    assert "Sparse: " in (out / "bench.md").read_text() and "graph path, eager" in (out / "bench.md").read_text()


def test_fit_tells_a_family_not_measured_from_one_that_fits_nothing():
    from sparse_fcmae.bench.report import fit_best

    trial = {"max_batch": 0, "peak_mem_mb": None, "trials": []}
    sparse_only = {"variants": {"sparse": dict(trial, max_batch=24)}, "max_batch_tried": 64}
    assert fit_best(sparse_only, None, "dense_masked") == ("not measured", "n/a")
    assert fit_best(sparse_only, None, "dense") == ("not measured", "n/a")
    measured = {"variants": {"sparse": dict(trial, max_batch=24), "dense_masked[cl]": trial, "dense[cl]": trial},
                "max_batch_tried": 64}
    assert fit_best(measured, None, "dense_masked") == ("none fits", "0")
    assert fit_best(measured, None, "dense") == ("none fits", "0")  # dense_masked[...] is not the dense family
    only_masked = {"variants": {"dense_masked[cl]": trial}, "max_batch_tried": 64}
    assert fit_best(only_masked, None, "dense") == ("not measured", "n/a")
