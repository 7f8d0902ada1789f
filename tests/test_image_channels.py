"""How image files become (in_chans, H, W) tensors: bit depth, palettes, .npy layouts."""
import numpy as np
import pytest
import torch
from PIL import Image

from sparse_fcmae.data import load_image_chw


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_not_clipped_for_any_channel_count(tmp_path, suffix):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once, 0..65535
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # really a 16-bit file
    want = torch.from_numpy(ramp.astype(np.float64) / 65535.0)
    for in_chans in (1, 3, 4):
        x = load_image_chw(str(path), in_chans)
        assert x.shape == (in_chans, 256, 256)
        for c in range(in_chans):
            torch.testing.assert_close(x[c].double(), want, rtol=0, atol=1e-7)
