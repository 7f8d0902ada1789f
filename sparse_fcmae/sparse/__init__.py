"""MinkowskiEngine-facing layers of the sparse encoder."""
from .layers import SparseDepthwiseConv, SparseDownsample, SparseDropPath, SparseGRN, SparseLayerNorm
from .neighbors import child_table, neighbor_table, sample_segments
from .tensor import batch_index, densify, to_sparse, with_features

__all__ = [
    "batch_index",
    "child_table",
    "densify",
    "neighbor_table",
    "sample_segments",
    "to_sparse",
    "with_features",
    "SparseDepthwiseConv",
    "SparseDownsample",
    "SparseDropPath",
    "SparseGRN",
    "SparseLayerNorm",
]
