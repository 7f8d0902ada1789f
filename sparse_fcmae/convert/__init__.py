"""Conversion between the ConvNeXt V2 weight layouts (sparse FCMAE, official dense, timm, Hugging Face).

In the order a checkpoint flows: ``rules`` (one key rule table per layout, read both ways, all through timm's
layout), ``shapes`` (what a file is: layout, size, channels, completeness), ``files`` (reading any format,
``load_weights``, streaming writers, ``convert_file`` behind ``sparse-fcmae convert``), ``hf`` (``--to hf``
folders) and ``verify`` (``--verify``: the result against an independent model). Nothing here needs
MinkowskiEngine except ``--verify`` of a sparse model.
"""
from .files import SOURCES, TARGETS, convert_file, load_weights, read_weights, resolve_arch, source_format
from .rules import (
    CONV_MLP_SIZES,
    FCMAE_DECODER_PREFIXES,
    RULES,
    ConversionError,
    convert_items,
    convert_state,
    dense_to_timm,
    encoder_state,
    sparse_to_timm,
    timm_to_dense,
    timm_to_sparse,
)
from .shapes import check_complete, describe, detect_layout, meta_state, timm_shapes
from .verify import VerifyError, load_timm_state

__all__ = [
    "CONV_MLP_SIZES", "FCMAE_DECODER_PREFIXES", "RULES", "SOURCES", "TARGETS", "ConversionError", "VerifyError",
    "check_complete", "convert_file", "convert_items", "convert_state", "dense_to_timm", "describe", "detect_layout",
    "encoder_state", "load_timm_state", "load_weights", "meta_state", "read_weights", "resolve_arch", "source_format",
    "sparse_to_timm", "timm_shapes", "timm_to_dense", "timm_to_sparse",
]
