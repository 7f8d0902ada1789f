"""The benchmark's models: the three families on the same weights, and the FLOP count of a dense step."""
from __future__ import annotations

import torch

from .options import BenchOptions, Config


class TimmEncoder(torch.nn.Module):
    """A dense ConvNeXt V2 (timm's; ``ConvNeXtV2_3D`` for volumes) as an FCMAE encoder that ignores the mask:
    ``(B, Cin, *S) -> (B, C, *S/32)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_features(x)


def build_reference_state(opts: BenchOptions, size: str) -> dict[str, torch.Tensor]:
    """Seeded FCMAE weights (official layout); GRN gamma/beta made non-zero so GRN does real work."""
    from ..models import FCMAE

    torch.manual_seed(opts.seed)
    model = FCMAE(size=size, in_chans=opts.in_chans, decoder_dim=opts.decoder_dim,
                  decoder_depth=opts.decoder_depth, encoder="dense_masked", spatial_dims=opts.spatial_dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_variant(variant: str, size: str, state: dict, opts_dict: dict) -> torch.nn.Module:
    """One family's FCMAE with ``state`` loaded (strictly); memory layout and compilation are applied
    by :func:`prepare` (the benchmark) or the caller."""
    from ..models import FCMAE

    dims = opts_dict.get("spatial_dims", 2)
    kw = dict(size=size, in_chans=opts_dict["in_chans"], decoder_dim=opts_dict["decoder_dim"],
              decoder_depth=opts_dict["decoder_depth"], spatial_dims=dims)
    if variant in ("sparse", "dense_masked"):
        model = FCMAE(encoder=variant, **kw)
        model.load_state_dict(state)
        return model
    model = FCMAE(encoder="dense_masked", **kw)
    model.load_state_dict(state)
    if dims == 3:  # no timm model for volumes: ours, mapped by the dense3d conversion
        from ..convert.dense3d import sparse_to_dense3d
        from ..models.convnext3d import ConvNeXtV2_3D

        net = ConvNeXtV2_3D(size, in_chans=opts_dict["in_chans"])
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        net.load_state_dict(sparse_to_dense3d(enc))
        model.encoder = TimmEncoder(net)
        return model
    import timm

    from ..convert import sparse_to_timm

    net = timm.create_model(f"convnextv2_{size}", pretrained=False, num_classes=0)
    missing, unexpected = net.load_state_dict(sparse_to_timm(state, size), strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"timm weights do not match: missing {missing}, unexpected {unexpected}")
    model.encoder = TimmEncoder(net)
    return model


def prepare(config: Config, model: torch.nn.Module, device: torch.device):
    """``(model, step_fn)``: the model on ``device`` in the configuration's memory layout, and the
    callable a step runs (``torch.compile`` of the whole FCMAE forward for compiled configurations:
    compiling only the encoder module would compile nothing, FCMAE calls its ``forward_features``)."""
    model = model.to(device).to(memory_format=config.tensor_format(model.spatial_dims))
    set_fmt = getattr(model.encoder, "set_memory_format", None)
    if set_fmt is not None:  # the dense-masked encoder keeps its maps in this layout between blocks
        set_fmt(config.memory_format)
    if config.family == "sparse" and config.graph:
        model.encoder.use_graph()
    if config.compiled and config.family == "sparse":  # the graph path: the whole step in one graph
        mode = None if config.compile_mode == "default" else config.compile_mode
        return model, torch.compile(model, mode=mode)
    return model, (torch.compile(model) if config.compiled else model)


def count_flops(opts: BenchOptions, size: str, batch: int, img: int, mode: str) -> tuple[float, float]:
    """``(total, stages)`` GFLOPs (2 x multiply-adds of convs and linears) of one dense step, by formula, for
    images or (``opts.spatial_dims=3``) volumes of edge ``img``.

    ``train`` = forward + backward = 3x forward (input and weight gradients) less the stem's input
    gradient, which nobody needs. Written out by hand because ``FlopCounterMode`` overcounts the
    backward of grouped (depthwise) convolutions (torch 2.14: 3.7x); its forward count agrees with
    this formula exactly (tested).
    """
    from ..models.sizes import get_size

    depths, dims = get_size(size)
    d = opts.spatial_dims
    stem = opts.in_chans * 4 ** d * dims[0] * (img // 4) ** d
    stages, res = 0, img // 4
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i > 0:
            res //= 2
            stages += 2 ** d * dims[i - 1] * c * res ** d  # 2^d stride-2 downsampling
        stages += depth * (7 ** d * c + 8 * c * c) * res ** d  # depthwise 7^d, Linear(c, 4c), Linear(4c, c)
    g2, dd = (img // 32) ** d, opts.decoder_dim
    decoder = (dims[-1] * dd + opts.decoder_depth * (7 ** d * dd + 8 * dd * dd) + dd * 32 ** d * opts.in_chans) * g2
    total = stem + stages + decoder
    if mode == "train":
        total, stages = 3 * total - stem, 3 * stages
    return 2 * batch * total / 1e9, 2 * batch * stages / 1e9


def bench_masks(opts: BenchOptions, batch: int, grid: tuple[int, ...], ratio: float, n: int) -> list[torch.Tensor]:
    """``n`` seeded patch masks: the same for every configuration (and every run with the same seed)."""
    from ..masking import random_patch_mask

    mgen = torch.Generator().manual_seed(opts.seed + 1000 + int(round(ratio * 1000)))
    return [random_patch_mask(batch, grid, ratio, generator=mgen) for _ in range(n)]


def bench_inputs(opts: BenchOptions, batch: int, img: int) -> torch.Tensor:
    """Seeded random images ``(B, C, S, S)`` or volumes ``(B, C, S, S, S)``."""
    gen = torch.Generator().manual_seed(opts.seed + 1)
    return torch.randn(batch, opts.in_chans, *(img,) * opts.spatial_dims, generator=gen)
