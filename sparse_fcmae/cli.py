"""Command line: ``sparse-fcmae pretrain [hydra overrides]``."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys


def config_dir() -> pathlib.Path:
    """The hydra config folder: $SPARSE_FCMAE_CONF, the installed copy, or the source tree's conf/."""
    env = os.environ.get("SPARSE_FCMAE_CONF")
    here = pathlib.Path(__file__).resolve().parent
    for cand in ([pathlib.Path(env)] if env else []) + [here / "conf", here.parent / "conf"]:
        if (cand / "pretrain.yaml").is_file():
            return cand
    raise FileNotFoundError("cannot find the config folder (conf/pretrain.yaml); set SPARSE_FCMAE_CONF")


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    cfg = compose("pretrain", args.overrides)
    pretrain(cfg)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert_cli import VerifyError, convert_file

    try:
        convert_file(args.input, args.output, src_format=args.src, target=args.to, arch=args.arch, verify=args.verify)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    finetune(compose(args.command, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparse-fcmae", description="Sparse ConvNeXt V2 FCMAE pretraining on MinkowskiEngine.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="FCMAE pretraining (hydra overrides, e.g. model=tiny data=imagefolder data.root=...)")
    p.add_argument("overrides", nargs="*", help="hydra overrides key=value")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("convert", help="convert weights: sparse FCMAE / official FCMAE / official dense <-> timm / official / sparse-fcmae")
    p.add_argument("input", help="checkpoint to read (.pth/.pt or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="file to write (timm: .safetensors unless the name ends in .pth/.pt)")
    p.add_argument("--from", dest="src", default="auto", help="auto | sparse-fcmae | official-fcmae | official-dense | timm")
    p.add_argument("--to", default="timm", help="timm | official | sparse-fcmae")
    p.add_argument("--arch", default=None, help="convnextv2_<size>; checked against the checkpoint (detected when left out)")
    p.add_argument("--verify", action="store_true", help="compare the sparse encoder (mask ratio 0) with the dense model")
    p.set_defaults(func=cmd_convert)
    for name, what in (("finetune", "fine-tune timm ConvNeXt V2 from converted weights (hydra overrides, e.g. weights=w.safetensors)"),
                       ("linprobe", "linear probe: frozen encoder, linear head (hydra overrides, e.g. weights=checkpoint-last.pth)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("overrides", nargs="*", help="hydra overrides key=value")
        p.set_defaults(func=cmd_finetune)
    return ap


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
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {msg}" if not msg else f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
