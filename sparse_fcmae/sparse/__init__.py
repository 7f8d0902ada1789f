"""MinkowskiEngine-facing layers of the sparse encoder."""
from .tensor import densify, to_sparse, with_features, batch_index
from .layers import SparseDepthwiseConv, SparseDropPath, SparseGRN, SparseLayerNorm
from .neighbors import neighbor_table

__all__ = [
    "batch_index",
    "densify",
    "neighbor_table",
    "to_sparse",
    "with_features",
    "SparseDepthwiseConv",
    "SparseDropPath",
    "SparseGRN",
    "SparseLayerNorm",
]
