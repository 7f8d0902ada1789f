"""Command line: ``sparse-fcmae pretrain [hydra overrides]``."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys


def __getattr__(name: str):
    """``compose`` / ``config_dir`` (the tests' and benchmarks' entry too), imported on first use: they need
    omegaconf and hydra, which ``sparse-fcmae bench`` does without (the GPU image has neither)."""
    if name in ("compose", "config_dir"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hydra_flags(args: argparse.Namespace, name: str):
    """Hydra's own flags, as users of hydra apps try them: ``--cfg job`` prints the resolved config and
    stops; ``--multirun`` is refused (one run per command). Returns the config, or None when done."""
    if args.multirun:
        raise ValueError("--multirun is not supported: run one command per configuration (a shell loop, a SLURM array)")
    from .config import compose

    cfg = compose(name, args.overrides)
    if args.cfg is not None:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return None
    return cfg


def config_help(name: str) -> str:
    """The config groups and their options, for ``--help``."""
    from .config import config_dir

    root = config_dir()
    groups = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
    lines = [f"config: conf/{name}.yaml; override any key as key=value (show them all: --cfg job)", "config groups:"]
    for g in groups:
        lines.append(f"  {g.name}={'|'.join(sorted(f.stem for f in g.glob('*.yaml')))}")
    return "\n".join(lines)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .training import pretrain

    cfg = _hydra_flags(args, "pretrain")
    if cfg is not None:
        pretrain(cfg)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import VerifyError, convert_file

    try:
        convert_file(args.input, args.output, src_format=args.src, target=args.to, arch=args.arch, verify=args.verify)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    cfg = _hydra_flags(args, args.command)
    if cfg is not None:
        finetune(cfg)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.from_json is not None:  # re-render beside the JSON unless told otherwise
        src = pathlib.Path(args.from_json)
        args.out = args.out or str(src.parent)
        args.label = args.label or src.stem
    elif args.out is None:
        raise ValueError("bench: --out DIR is required (the folder for the results)")
    args.label = args.label or "bench"
    paths = bench.main(bench.make_options(args), from_json=args.from_json)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from .bench import data_pipeline

    for kind, path in data_pipeline.main(args).items():
        print(f"{kind}: {path}")
    return 0


def _one_line_error(message: str) -> None:
    """argparse error handler for a subcommand: one ``error:`` line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's own errors (a missing argument, an unknown option) as one ``error:`` line naming the
    command's --help, instead of its usage block and a ``prog: error:`` line."""
    parser.error = lambda message: _one_line_error(f"{message} (see {parser.prog} --help)")
    return parser


def _safe_config_help(name: str) -> str | None:
    try:
        return config_help(name)
    except (OSError, ImportError):  # no config folder, or no omegaconf (the GPU image): --help still works
        return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="sparse-fcmae", description="Sparse ConvNeXt V2 FCMAE pretraining on MinkowskiEngine.")
    ap.add_argument("--version", action="version", version=f"sparse-fcmae {__version__}")
    _one_line_errors(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    def hydra_command(name: str, what: str, func) -> None:
        p = _one_line_errors(sub.add_parser(name, help=what, description=what, epilog=_safe_config_help(name),
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
        p.add_argument("overrides", nargs="*", help="hydra overrides key=value")
        p.add_argument("--cfg", "-c", choices=["job", "all"], default=None,
                       help="print the resolved config (job and all are the same here) and exit")
        p.add_argument("--multirun", "-m", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(func=func)

    hydra_command("pretrain", "FCMAE pretraining (hydra overrides, e.g. model=tiny data=imagefolder data.root=...)",
                  cmd_pretrain)
    p = _one_line_errors(sub.add_parser("convert", help="convert weights: sparse FCMAE / official FCMAE / official dense "
                                                        "<-> timm / official / sparse-fcmae; -> Hugging Face"))
    p.add_argument("input", help="checkpoint to read (.pth/.pt or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="file to write (timm: .safetensors unless the name ends in .pth/.pt); --to hf: a new folder")
    p.add_argument("--from", dest="src", default="auto", help="auto | sparse-fcmae | official-fcmae | official-dense | timm | hf")
    p.add_argument("--to", default="timm", help="timm | official | sparse-fcmae | hf (transformers ConvNextV2Model folder) "
                                                "| dense3d (a 3D checkpoint -> the dense 3D ConvNeXt V2, .safetensors)")
    p.add_argument("--arch", default=None, help="convnextv2_<size>; checked against the checkpoint (detected when left out)")
    p.add_argument("--verify", action="store_true", help="compare the sparse encoder (mask ratio 0) with the dense model")
    p.set_defaults(func=cmd_convert)
    for name, what in (("finetune", "fine-tune timm ConvNeXt V2 from converted weights (hydra overrides, e.g. weights=w.safetensors)"),
                       ("linprobe", "linear probe: frozen encoder, linear head (hydra overrides, e.g. weights=checkpoint-last.pth)")):
        hydra_command(name, what, cmd_finetune)


    p = _one_line_errors(sub.add_parser("bench", help="throughput and memory: sparse vs dense-masked vs dense FCMAE (JSON, markdown, PNG)"))
    p.add_argument("--out", default=None,
                   help="output folder for <label>.json, <label>.md and <label>.png (with --from-json: the JSON's folder)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--sizes", default="atto", help="comma-separated model sizes (default: atto)")
    p.add_argument("--spatial-dims", type=int, default=2, help="2: images (default); 3: volumes (edges in --img-size)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 8; volumes 2)")
    p.add_argument("--img-size", default=None,
                   help="comma-separated image sizes or volume edges, multiples of 32 (default: 224; volumes 64)")
    p.add_argument("--mask-ratios", default="0,0.3,0.5,0.6,0.75,0.9", help="comma-separated mask ratios in [0, 1)")
    p.add_argument("--modes", default="forward,train", help="forward and/or train (default: both)")
    p.add_argument("--variants", default="sparse,dense_masked,dense", help="model families to run: sparse, dense_masked, dense (default: all three)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: 3; volumes 1)")
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=1)
    p.add_argument("--layouts", default="channels_last,nchw",
                   help="memory layouts the dense configurations run in (default: channels_last,nchw)")
    p.add_argument("--executions", default="eager,compiled",
                   help="eager and/or compiled (torch.compile of the whole FCMAE step) for the dense configurations "
                        "(default: both)")
    p.add_argument("--sparse-compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="the sparse encoder on its graph path (no MinkowskiEngine object, static shapes) and the whole step "
                        "torch.compile'd; "
                        "MODE is torch.compile's mode (default, reduce-overhead: CUDA graphs, max-autotune-no-cudagraphs)")
    p.add_argument("--sparse-graph", action="store_true",
                   help="the sparse encoder on its graph path, eagerly (what --sparse-compile compiles): against the "
                        "default MinkowskiEngine path, what MinkowskiEngine's bookkeeping costs")
    p.add_argument("--sparse-layout", default=None,
                   help="memory layout of the sparse variant's dense stem and decoder (default: channels_last; volumes nchw)")
    p.add_argument("--mem-budget-gb", type=float, default=None, metavar="GIB",
                   help="memory fit: also find the largest training batch each configuration fits in GIB GiB of peak memory")
    p.add_argument("--fit-max-batch", type=int, default=64, help="memory fit: the largest batch tried (default: 64)")
    p.add_argument("--fit-only", action="store_true", help="memory fit only (with --mem-budget-gb): no throughput rows")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 (default) or bf16 autocast around forward and loss, as pretraining's precision=bf16")
    p.add_argument("--label", default=None,
                   help="file name stem of the outputs (default: bench; with --from-json: the JSON's own stem)")
    p.add_argument("--note", default=None, help="free text stored in the results (e.g. 'measured under load')")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; start no new configuration after that and write what was measured")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="measure nothing: re-render the table and plot of a results JSON (e.g. one from a GPU machine)")
    p.set_defaults(func=cmd_bench)

    p = _one_line_errors(sub.add_parser("bench-data", help="images/s of the data pipeline per loader worker: an image "
                                                             "folder and WebDataset shards (size data.num_workers per GPU)"))
    p.add_argument("--out", required=True, help="output folder for <label>.json and <label>.md")
    p.add_argument("--root", default=None, help="an image folder (root/<class>/<image>); default: --sample-images "
                                                "JPEG crops of scikit-learn's sample photos")
    p.add_argument("--urls", default=None, help="shards to read (a brace pattern); default: written from the folder")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default: 0,1,2)")
    p.add_argument("--img-size", type=int, default=224, help="crop size, a multiple of 32 (default: 224)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--sample-images", type=int, default=512, help="images made when --root is not given (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="bench-data", help="file name stem of the outputs (default: bench-data)")
    p.add_argument("--note", default=None, help="free text stored in the results")
    p.set_defaults(func=cmd_bench_data)
    return ap


def _worker_message(text: str) -> str | None:
    """An error raised in a DataLoader worker reaches us as "Caught X in DataLoader worker process N." and the
    worker's traceback: its own message is the traceback's last ``X: ...`` line."""
    import re

    m = re.match(r"Caught (\w+) in DataLoader worker process \d+\.", text.strip())
    if m is None:
        return None
    own = [ln for ln in text.splitlines() if re.match(rf"(?:[\w.]+\.)?{m.group(1)}: ", ln)]
    return own[-1].split(": ", 1)[1] if own else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user; set SPARSE_FCMAE_DEBUG=1 for the traceback
        if os.environ.get("SPARSE_FCMAE_DEBUG"):
            raise
        msg = _worker_message(str(e)) or (str(e).strip().splitlines()[0] if str(e).strip() else "")
        print(f"error: {type(e).__name__}: {msg}" if not msg else f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
