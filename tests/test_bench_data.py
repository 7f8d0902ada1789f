"""``sparse-fcmae bench-data`` through the CLI: one pass per (source, workers) over a real JPEG folder (one file
corrupt) and the shards written from it; the JSON's structure and counts, never its speeds."""
import json
import subprocess
import sys

import numpy as np
from _pretrain_run import ROOT, _env


def test_bench_data_reads_every_image_once_per_source_and_worker_count(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    cls = tmp_path / "folder" / "cls"
    cls.mkdir(parents=True)
    for i in range(23):
        Image.fromarray(photo[i * 5:i * 5 + 120, i * 9:i * 9 + 160]).save(cls / f"{i:03d}.jpg", quality=90)
    (cls / "bad.jpg").write_bytes(b"not a jpeg")  # 24 files: replaced and counted, as in training
    cmd = [sys.executable, "-m", "sparse_fcmae.cli", "bench-data", "--root", str(tmp_path / "folder"), "--workers", "0,2",
           "--img-size", "64", "--batch", "8", "--out", str(tmp_path / "out"), "--label", "pipe"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "pipe.json").read_text())
    assert res["schema"] == "sparse-fcmae-bench-data/1" and res["machine"]["git_commit"] and res["machine"]["cpu_model"]
    assert res["settings"]["images"] == 24 and res["settings"]["img_size"] == 64
    got = {(x["source"], x["workers"]): x for x in res["results"]}
    assert sorted(got) == [("imagefolder", 0), ("imagefolder", 2), ("webdataset", 0), ("webdataset", 2)]
    for x in got.values():
        assert x["images"] == 24 and x["skipped"] == 1, x  # every file once, the corrupt one counted
        assert x["images_per_s"] > 0 and x["seconds"] > 0
    assert np.isclose(got[("imagefolder", 2)]["images_per_s_per_worker"], got[("imagefolder", 2)]["images_per_s_steady"] / 2,
                      atol=0.1)
    md = (tmp_path / "out" / "pipe.md").read_text()
    assert md.count("\n| imagefolder |") == 2 and md.count("\n| webdataset |") == 2
    assert "json:" in r.stdout and "md:" in r.stdout
