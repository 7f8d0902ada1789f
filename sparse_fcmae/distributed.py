"""Process-group set-up for DDP: torchrun's variables, or SLURM's when torchrun's are absent.

One process per GPU (NCCL) or per CPU worker (gloo). Nothing here runs for a plain single process.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[03-05,07],cpu1`` -> ``gpu03`` (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def env_from_environment(environ: dict[str, str] | None = None) -> tuple[DistEnv, dict[str, str]]:
    """Rank/world size from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or, failing that,
    from SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``).

    Returns the environment and the rendezvous variables to export (MASTER_ADDR / MASTER_PORT).
    """
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        env = DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)))
        return env, {}
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        env = DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)))
        extra = {
            "MASTER_ADDR": e.get("MASTER_ADDR") or first_slurm_host(e.get("SLURM_STEP_NODELIST") or e.get("SLURM_NODELIST", "127.0.0.1")),
            # a port derived from the job id, so two jobs sharing a node do not collide
            "MASTER_PORT": e.get("MASTER_PORT") or str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000),
        }
        return env, extra
    return DistEnv(), {}


def init_distributed(device_type: str, backend: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join the process group when launched by torchrun/SLURM with more than one process.

    ``timeout_s`` bounds every collective: a rank that hangs or whose host vanishes without closing its
    connections stops the others after that long instead of never."""
    env, extra = env_from_environment()
    if not env.enabled:
        return env
    os.environ.update(extra)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return env


# what gloo and NCCL say when a peer died, hung past the timeout, or the network broke (plain RuntimeErrors)
_PEER_FAILURE_MARKERS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                         "pair closure", "Broken pipe")


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from a collective that failed because another rank is gone or not answering."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_FAILURE_MARKERS)


def peer_failure_message(e: BaseException, env: DistEnv, run_dir) -> str:
    """One line for a rank whose peer is gone: who (the other rank when there are two), why, what next."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    why = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")  # gloo: "[file.cc:561] Reason. Hint..."
    who = f"rank {1 - env.rank} of 2" if env.world_size == 2 else f"another rank (of {env.world_size})"
    return (f"error: {who} stopped or stopped answering ({why[:160]}): rank {env.rank} stops too; run the same "
            f"command again to resume from the last checkpoint in {run_dir}")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj: Any) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
