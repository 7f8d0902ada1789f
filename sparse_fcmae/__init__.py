"""sparse-fcmae: ConvNeXt V2 FCMAE pretraining with a true sparse (MinkowskiEngine) encoder."""

__version__ = "0.1.0"

import warnings as _warnings

# MinkowskiEngine warns on every import of a CPU-only build; that build is intended on CPU machines.
_warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
