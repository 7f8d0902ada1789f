"""ConvNeXt V2 encoders (sparse and dense-masked), the FCMAE model and the named sizes."""
from .convnextv2 import DenseMaskedConvNeXtV2, SparseConvNeXtV2
from .fcmae import FCMAE
from .sizes import SIZES, get_size

__all__ = ["DenseMaskedConvNeXtV2", "FCMAE", "SIZES", "SparseConvNeXtV2", "get_size"]
