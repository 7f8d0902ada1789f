"""Suite-wide options: ``--device`` runs the oracle checks marked ``gpu`` on another device, ``--results-json``
keeps every outcome (and the errors the checks recorded) as a committed-results file.

  pytest -m gpu --device cuda --results-json OUT.json    # what benchmarks/gpu_bench.sh runs on a GPU
"""
import json
import time

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the checks marked gpu (cpu or cuda[:N]; default cpu)")
    parser.addoption("--results-json", default=None, metavar="PATH",
                     help="write each test's outcome and recorded errors, with machine info and commit, as JSON")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: an oracle check that takes the --device fixture (pytest -m gpu --device cuda)")
    dev = torch.device(config.getoption("--device"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device")
        # float32 without TF32, so the GPU tolerances are the CPU tests' own
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif dev.type != "cpu":
        raise pytest.UsageError(f"--device must be cpu or cuda[:N], got {dev}")


@pytest.fixture
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def cuda_device(device) -> torch.device:
    """For checks of the CUDA path itself (no CPU counterpart): they run under ``--device cuda``."""
    if device.type != "cuda":
        pytest.skip("a check of the CUDA path: pytest -m gpu --device cuda")
    return device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_OUTCOMES: list = []  # one row per test, for --results-json


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # a skip or setup error has no call phase
        _OUTCOMES.append({"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
                          "seconds": round(report.duration, 3),
                          **({"recorded": dict(report.user_properties)} if report.user_properties else {}),
                          **({"why": str(report.longrepr)[-2000:]} if report.outcome != "passed" else {})})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--results-json")
    if not path:
        return
    from sparse_fcmae.checkpoint import atomic_write
    from sparse_fcmae.machine import git_commit, machine_info

    dev = torch.device(session.config.getoption("--device"))
    outcomes = _OUTCOMES
    summary = {k: sum(o["outcome"] == k for o in outcomes) for k in ("passed", "failed", "skipped")}
    result = {"what": "pytest " + " ".join(session.config.invocation_params.args), "device": str(dev),
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "commit": git_commit(), "machine": machine_info(), "exit_status": int(exitstatus),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary,
              "tests": outcomes}
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
