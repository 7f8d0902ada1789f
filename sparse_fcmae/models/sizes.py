"""Named ConvNeXt V2 sizes (depths, dims), as in the official code and timm."""
from __future__ import annotations

SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def get_size(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(depths, dims)`` of a named size; accepts ``atto`` or ``convnextv2_atto``."""
    key = name.removeprefix("convnextv2_")
    if key not in SIZES:
        raise ValueError(f"unknown ConvNeXt V2 size {name!r}; choose one of {', '.join(SIZES)}")
    return SIZES[key]
