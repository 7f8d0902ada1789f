"""sparse-fcmae: build and install, with the C++/CUDA kernels of ``csrc/`` as ``sparse_fcmae._C``.

The CPU extension is always built (set ``SPARSE_FCMAE_NO_EXT=1`` to skip it; the ops then fall back to
their pure-torch references with a warning). The CUDA sources are added when torch sees a GPU or
``FORCE_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` picks the architectures as usual.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SPARSE_FCMAE_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    # -O3 auto-vectorises; no -march=native so the binary runs on any x86-64 (AVX2 via multiversioning).
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    with_cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "*.cu")))
        ext = CUDAExtension(
            "sparse_fcmae._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("sparse_fcmae._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="sparse-fcmae",
    version="0.1.0",
    description="ConvNeXt V2 FCMAE pretraining with a true sparse MinkowskiEngine encoder",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_fcmae", "sparse_fcmae.*"]) + ["sparse_fcmae.conf"],
    package_dir={"sparse_fcmae.conf": "conf"},
    package_data={"sparse_fcmae.conf": ["*.yaml", "*/*.yaml"]},
    entry_points={"console_scripts": ["sparse-fcmae=sparse_fcmae.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
