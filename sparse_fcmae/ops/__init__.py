"""Sparse ops: compiled kernels (``sparse_fcmae._C``) with pure-torch references (oracles, fallbacks)."""
from .backend import extension_available
from .depthwise import sparse_depthwise_conv, sparse_depthwise_conv_reference, transpose_neighbors
from .grn import batch_segments, sparse_grn, sparse_grn_reference

__all__ = [
    "batch_segments",
    "extension_available",
    "sparse_depthwise_conv",
    "sparse_depthwise_conv_reference",
    "sparse_grn",
    "sparse_grn_reference",
    "transpose_neighbors",
]
