"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills or requeues a job) asks the training
loop to finish the step it is in, write ``checkpoint-last.pth`` with its position, and stop; the same
command started again resumes there. With ``SLURM_JOB_ID`` set and ``requeue=true`` the job requeues
itself (``scontrol requeue``), as the official repository's SLURM launcher does."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the loop after the step in which a stop was requested (on every rank at the same step)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1 set ``signum`` instead of killing the process."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous.clear()


def requeue_slurm_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID``; returns what happened, in one line."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not requeued: scontrol failed ({e})"
    if r.returncode != 0:
        return f"not requeued: scontrol requeue {job} exited {r.returncode} ({(r.stderr or r.stdout).strip()[:200]})"
    return f"requeued SLURM job {job}"


def stopped(command: str, signum: int, step: int, checkpoint, requeue: bool) -> str:
    """The one line a stopped run prints (after its checkpoint), requeueing the SLURM job first when asked."""
    what = requeue_slurm_job() if requeue else "run the same command again to resume"
    return f"[{command}] stopped by {signal.Signals(signum).name} after step {step}: {checkpoint} written; {what}"
