"""MinkowskiEngine-facing layers of the sparse encoder."""
from .tensor import densify, to_sparse, with_features, batch_index
from .layers import SparseDepthwiseConv, SparseDownsample, SparseDropPath, SparseGRN, SparseLayerNorm
from .neighbors import child_table, neighbor_table, neighbor_tables, sample_segments

__all__ = [
    "batch_index",
    "child_table",
    "densify",
    "neighbor_table",
    "neighbor_tables",
    "sample_segments",
    "to_sparse",
    "with_features",
    "SparseDepthwiseConv",
    "SparseDownsample",
    "SparseDropPath",
    "SparseGRN",
    "SparseLayerNorm",
]
