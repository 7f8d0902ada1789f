"""One configuration per worker process, driven step by step over a pipe (see ``driver``)."""
from __future__ import annotations

import ctypes
import time

import torch

from .options import Config


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


class _CpuPeak:
    """Per-configuration peak RSS: trim the heap, reset the high-water mark, read VmHWM later."""

    def __init__(self):
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None
        self.resettable = self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        import gc

        gc.collect()
        if self._trim is not None:
            self._trim(0)
        self._reset_hwm()

    @staticmethod
    def peak_kb() -> int:
        return _rss_kb("VmHWM")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def worker_main(conn, config: Config, size: str, state_path: str, opts_dict: dict) -> None:
    """Serve ``config`` / ``step`` / ``peak`` / ``stop`` requests for one configuration."""
    try:
        import timm  # noqa: F401  (imported before the baseline: libraries are not the variant's memory)

        import sparse_fcmae  # noqa: F401  (silences ME's CPU-only warning)

        from ..checkpoint import load_checkpoint
        from ..models import convnextv2  # noqa: F401
        from ..optim import adamw
        from .variants import build_variant, prepare

        device = torch.device(opts_dict["device"])
        cuda = device.type == "cuda"
        cpu_peak = None if cuda else _CpuPeak()
        if cuda:
            torch.cuda.init()
            # cuDNN picks the fastest algorithm per shape (the official pretraining sets it too)
            torch.backends.cudnn.benchmark = True
            base = torch.cuda.memory_allocated(device)
        else:
            cpu_peak.reset()
            base = _rss_kb("VmRSS") * 1024
        blob = load_checkpoint(state_path)
        model, step_model = prepare(config, build_variant(config.family, size, blob["state"], opts_dict), device)
        imgs = blob["images"].to(device).contiguous(memory_format=config.tensor_format(blob["images"].ndim - 2))
        opt = adamw(model.parameters(), device, lr=1.5e-4, weight_decay=0.05)  # fused on CUDA, for every variant alike
        conn.send(("ok", {"memory_resettable": True if cuda else cpu_peak.resettable}))
    except Exception as e:  # report, so the run goes on with the other configurations
        conn.send(("error", _one_line(e)))
        return

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    masks, mode, steady = None, None, base
    # bf16: autocast around forward and loss, as the training loop does (float32 weights and optimizer)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts_dict.get("precision") == "bf16")

    def step(i: int) -> float:
        mask = masks[i % len(masks)]
        sync()
        t0 = time.perf_counter()
        if mode == "train":
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = step_model(imgs, mask)[0]
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), amp:
                loss = step_model(imgs, mask)[0]
        sync()
        dt = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return dt

    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the driver went away
            return
        try:
            if msg[0] == "stop":
                conn.send(("ok", None))
                return
            if msg[0] == "config":  # new (mode, masks, ratio): warm up here, untimed (workers warm up side by side)
                mode, masks, warmup = msg[1], [m.to(device) for m in msg[2]], msg[3]
                model.mask_ratio = msg[4]  # the masks' ratio (the sparse graph path's visible count follows it)
                model.train(mode == "train")
                t0 = time.perf_counter()
                for i in range(warmup):
                    step(i)
                sync()
                warmup_s = time.perf_counter() - t0  # torch.compile compiles here
                # steady state between steps: weights, gradients, optimizer state, caches; the peak above it is
                # what a step adds (activations, which sparse shrinks, and the optimizer's temporaries)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    steady = torch.cuda.memory_allocated(device)
                else:
                    cpu_peak.reset()  # trims the heap first
                    steady = _rss_kb("VmRSS") * 1024
                conn.send(("ok", warmup_s))
            elif msg[0] == "step":
                conn.send(("ok", step(msg[1])))
            elif msg[0] == "peak":  # and how many graphs torch.compile has made so far (0: eager)
                from torch._dynamo.utils import counters

                peak = torch.cuda.max_memory_allocated(device) if cuda else cpu_peak.peak_kb() * 1024
                conn.send(("ok", ((peak - base) / 2**20, int(counters["stats"]["unique_graphs"]),
                                  (steady - base) / 2**20)))
        except Exception as e:  # this configuration's row fails; the worker serves the next one
            conn.send(("error", _one_line(e)))


class Worker:
    """The driver's handle on one worker process. ``error`` is the last request's failure (cleared by
    ``clear``); ``dead`` means the process is gone and every later request fails."""

    def __init__(self, ctx, config: Config, size: str, state_path: str, opts_dict: dict):
        self.config = config
        self.name = config.name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, config, size, state_path, opts_dict), daemon=True)
        self.proc.start()
        child.close()
        self.error: str | None = None
        self.dead = False
        self.info: dict = {}

    def send(self, *msg) -> None:
        if self.dead:
            return
        try:
            self.conn.send(msg)
        except (OSError, BrokenPipeError):
            self._died()

    def recv(self):
        """The answer to the last request; ``None`` (and ``error`` set) if it failed."""
        if self.dead:
            return None
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self._died()
            return None
        if status == "error":
            self.error = value
            return None
        return value

    def ask(self, *msg):
        self.send(*msg)
        return self.recv()

    def clear(self) -> None:
        if not self.dead:
            self.error = None

    def _died(self) -> None:
        self.proc.join(timeout=5)
        self.dead = True
        self.error = f"worker process died (exit code {self.proc.exitcode})"

    def close(self) -> None:
        if not self.dead and self.proc.is_alive():
            self.ask("stop")
        self.conn.close()  # a worker still waiting for requests gets EOF and exits
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
