"""Sparse ops: autograd entry points, with pure-torch references (test oracles and fallbacks)."""
from .depthwise import sparse_depthwise_conv, sparse_depthwise_conv_reference
from .grn import sparse_grn, sparse_grn_reference

__all__ = [
    "sparse_depthwise_conv",
    "sparse_depthwise_conv_reference",
    "sparse_grn",
    "sparse_grn_reference",
]
