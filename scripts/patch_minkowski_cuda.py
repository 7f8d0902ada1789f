"""CUDA 13 / torch 2.14 fixes for the stock MinkowskiEngine 0.5.4 source release.

Imported by ``patch_minkowski.py --cuda`` (the CPU-only build needs none of this). Each edit names
the text it expects through ``replace`` (which stops on a mismatch and skips an edit already applied),
so a re-run on patched sources is a no-op. The changes, found by compiling with nvcc 13.0:

1. setup.py: ``NVTX_DISABLE`` (the vendored cuDF NVTX clashes with CUDA's) and ``<CUDA_HOME>/include/cccl``
   in the include path (CUDA 13 moved thrust/cub there; nvcc finds it, g++ does not);
2. missing thrust headers (``execution_policy``, ``remove``, ``unique``, ``sort``);
3. ``find_coordinate`` derived from ``thrust::unary_function``, which CUDA 13 removed;
4. spmm.cu: ``<torch/extension.h>`` before the ``ATen/cuda`` headers (torch 2.14's CUDAUtils.h uses
   ``at::Tensor`` without including it);
5. ``cudaMemPrefetchAsync(ptr, n, int device, stream)`` is gone in CUDA 13: use the ``cudaMemLocation``
   form (guarded by ``CUDART_VERSION``, so CUDA 12 keeps the old call);
6. ``reserve()``: building the ``shared_ptr`` from ``release()`` plus the deleter (assigning the
   ``unique_ptr`` makes libstdc++ call an unqualified ``__to_address``, ambiguous with libcu++'s).
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable

Replace = Callable[..., None]

SETUP_ANCHOR = 'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda"]\n'
SETUP_ADDITION = '''
# sparse-fcmae (CUDA 13): the vendored cuDF NVTX clashes with CUDA's own; thrust/cub now live in
# <CUDA_HOME>/include/cccl, which nvcc finds by itself but g++ (quantization.cpp, ...) does not.
CC_FLAGS += ["-DNVTX_DISABLE"]
NVCC_FLAGS += ["-DNVTX_DISABLE"]
if not CPU_ONLY:
    from torch.utils.cpp_extension import CUDA_HOME as _TORCH_CUDA_HOME

    _cccl = os.path.join(CUDA_HOME or _TORCH_CUDA_HOME or "/usr/local/cuda", "include", "cccl")
    if os.path.isdir(_cccl):
        include_dirs.append(_cccl)
'''

PREFETCH_HELPER = '''#include <type_traits>

// sparse-fcmae: CUDA 13 removed cudaMemPrefetchAsync(ptr, n, int device, stream).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000
inline cudaMemLocation sparse_fcmae_device_location(int dev_id)
{
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id   = dev_id;
  return loc;
}
#define SPARSE_FCMAE_PREFETCH_TO(dev_id) sparse_fcmae_device_location(dev_id), 0
#else
#define SPARSE_FCMAE_PREFETCH_TO(dev_id) dev_id
#endif
'''

RESERVE_OLD = '''      m_map = map_type::create(
          compute_hash_table_size(size, m_hashtable_occupancy),
          m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);
'''
RESERVE_NEW = '''      {  // sparse-fcmae: shared_ptr from release() + deleter (unique_ptr assignment is ambiguous with libcu++)
        auto created = map_type::create(
            compute_hash_table_size(size, m_hashtable_occupancy),
            m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);
        auto deleter = created.get_deleter();
        m_map = std::shared_ptr<map_type>(created.release(), std::move(deleter));
      }
'''

CUMAP = "src/3rdparty/concurrent_unordered_map.cuh"


def _insert_after(root: pathlib.Path, rel: str, anchor: str, addition: str, replace: Replace) -> None:
    """Insert ``addition`` after ``anchor`` once (``replace`` alone would insert again on a re-run)."""
    if addition.strip() in (root / rel).read_text():
        return
    replace(root, rel, anchor, anchor + addition, count=1)


def patch_cuda(root: pathlib.Path, replace: Replace) -> list[str]:
    """Apply the CUDA 13 edits to the source tree at ``root``; returns their names."""
    done = []
    # 1. setup.py
    _insert_after(root, "setup.py", SETUP_ANCHOR, SETUP_ADDITION, replace)
    done.append("setup.py: NVTX_DISABLE + include/cccl")
    # 2. thrust headers
    _insert_after(root, CUMAP, "#include <thrust/count.h>\n", "#include <thrust/execution_policy.h>\n", replace)
    _insert_after(root, "src/coordinate_map_gpu.cu", "#include <thrust/sort.h>\n",
                  "#include <thrust/remove.h>\n#include <thrust/unique.h>\n", replace)
    done.append("thrust headers")
    # 3. thrust::unary_function is gone (nothing uses its typedefs)
    replace(root, "src/coordinate_map_functors.cuh",
            "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n                                    thrust::pair<uint32_t, uint32_t>> {\n",
            "struct find_coordinate {  // sparse-fcmae: no thrust::unary_function (removed in CUDA 13)\n", count=1)
    done.append("find_coordinate without unary_function")
    # 4. spmm.cu include order (+ its thrust headers)
    _insert_after(root, "src/spmm.cu", "#include <cusparse.h>\n",
                  "\n#include <torch/extension.h> // sparse-fcmae: before ATen/cuda (CUDAUtils.h needs at::Tensor)\n"
                  "#include <thrust/execution_policy.h>\n#include <thrust/sort.h>\n", replace)
    done.append("spmm.cu include order")
    # 5. cudaMemPrefetchAsync with a cudaMemLocation
    _insert_after(root, CUMAP, "#include <type_traits>\n", PREFETCH_HELPER.split("\n", 1)[1], replace)
    replace(root, CUMAP, "m_capacity * sizeof(value_type), dev_id, stream));",
            "m_capacity * sizeof(value_type), SPARSE_FCMAE_PREFETCH_TO(dev_id), stream));", count=2)
    replace(root, CUMAP, "cudaMemPrefetchAsync(this, sizeof(*this), dev_id, stream)",
            "cudaMemPrefetchAsync(this, sizeof(*this), SPARSE_FCMAE_PREFETCH_TO(dev_id), stream)", count=1)
    done.append("cudaMemPrefetchAsync(cudaMemLocation)")
    # 6. reserve(): shared_ptr from release()
    replace(root, "src/coordinate_map_gpu.cuh", RESERVE_OLD, RESERVE_NEW, count=1)
    done.append("reserve() shared_ptr")
    return done
