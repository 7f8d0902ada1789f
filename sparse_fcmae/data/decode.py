"""Reading one image file into a ``(C, H, W)`` float tensor: the channel rule, 16-bit, palette and ``.npy`` files."""
from __future__ import annotations

import numpy as np
import torch

NPY_EXTENSIONS = (".npy",)


NPY_LAYOUTS = ("auto", "chw", "hwc")


class NpyLayoutError(ValueError):
    """A 3-D ``.npy`` array whose channel axis cannot be told: a setting to fix, never a file to skip."""


def npy_channels_first(shape, in_chans: int, layout: str = "auto", path: str = "") -> bool:
    """Whether a 3-D array is ``(C, H, W)`` (True) or ``(H, W, C)`` (False); no limit on the band count.

    ``auto``: the first/last axis whose size is ``in_chans`` when exactly one of them is; else the smaller
    of the two; equal sizes are ambiguous (``NpyLayoutError``, naming ``data.npy_layout``).
    """
    if layout not in NPY_LAYOUTS:
        raise ValueError(f"data.npy_layout must be auto, chw or hwc, got {layout!r}")
    if layout != "auto":
        return layout == "chw"
    first, last = shape[0], shape[-1]
    if (first == in_chans) != (last == in_chans):
        return first == in_chans
    if first != last:
        return first < last
    raise NpyLayoutError(f"{path}: cannot tell whether the {tuple(shape)} array is (C, H, W) or (H, W, C) "
                         f"with in_chans={in_chans}; set data.npy_layout=chw or data.npy_layout=hwc")


def load_image_chw(path: str, in_chans: int, npy_layout: str = "auto", data: bytes | None = None) -> torch.Tensor:
    """Read an image file as a float ``(in_chans, H, W)`` tensor in [0, 1]; ``data``: the file's bytes (a shard
    member: ``path`` then only names it, its extension telling ``.npy`` from images).

    The channel rule: 8-bit files scale by 1/255, 16-bit by 1/65535, float files are taken as they are.
    ``in_chans`` 1 -> grayscale (PIL ``L`` conversion, or the channel mean for arrays); 3 -> RGB
    (PIL ``RGB`` conversion). 16-bit and float images are never converted by PIL (it would clip them
    at 255): they are scaled, then replicated. Palette images (``P``, ``PA``) become RGB(A) first, and
    gray + alpha (``LA``) RGBA for counts other than 1 and 3. Any other count -> the file's own channels
    (``.npy`` as ``(H, W, C)`` or ``(C, H, W)``, see ``npy_channels_first``; multi-page-free TIFF/PNG with alpha, ...) repeated
    cyclically up to ``in_chans`` and truncated past it: a 4-band RGBA or RGB+NIR file feeds ``in_chans=4`` unchanged, a grayscale
    file is repeated, a 6-band array keeps its first 4.
    """
    import io

    from PIL import Image

    source = path if data is None else io.BytesIO(data)
    if path.lower().endswith(NPY_EXTENSIONS):
        arr = np.load(source, allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        elif arr.ndim == 3 and npy_channels_first(arr.shape, in_chans, npy_layout, path):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.ndim != 3:
            raise ValueError(f"{path}: expected a (H, W), (H, W, C) or (C, H, W) array, got shape {arr.shape}")
    else:
        try:
            im = Image.open(source)
        except Image.UnidentifiedImageError:
            if data is None:
                raise
            raise ValueError("not an image file PIL can read") from None  # PIL's own words name a BytesIO object
        with im:
            im.load()
            arr = np.asarray(_decoded_mode(im, in_chans))
        if arr.ndim == 2:
            arr = arr[:, :, None]
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
    if arr.dtype.kind in "iu" and scale == 1.0:  # PIL mode I (32-bit ints): 16-bit data in practice
        scale = 65535.0
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1) / scale
    if x.shape[0] != in_chans:
        if in_chans == 1:
            x = x[:3].mean(0, keepdim=True)
        else:
            x = x.repeat((in_chans + x.shape[0] - 1) // x.shape[0], 1, 1)[:in_chans]
    return x.contiguous()


def _is_high_depth(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _decoded_mode(im, in_chans: int):
    """The PIL image whose array holds intensities (not palette indices) at the file's full depth."""
    if _is_high_depth(im.mode):  # 16-bit / 32-bit / float: convert("L"/"RGB") would clip at 255
        return im  # scaled by 1/65535 (ints) in load_image_chw, then replicated to in_chans
    if im.mode in ("P", "PA"):  # palette indices are not intensities: expand to colours (with alpha if any)
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if in_chans == 1:
        return im.convert("L")
    if in_chans == 3:
        return im.convert("RGB")
    if im.mode == "LA":  # gray + alpha -> RGBA, as a palette image with alpha
        return im.convert("RGBA")
    return im
