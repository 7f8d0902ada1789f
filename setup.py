"""sparse-fcmae: build and install (C++/CUDA kernels in csrc/ are added by the kernel issue)."""
from setuptools import find_packages, setup

setup(
    name="sparse-fcmae",
    version="0.1.0",
    description="ConvNeXt V2 FCMAE pretraining with a true sparse MinkowskiEngine encoder",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_fcmae", "sparse_fcmae.*"]) + ["sparse_fcmae.conf"],
    package_dir={"sparse_fcmae.conf": "conf"},
    package_data={"sparse_fcmae.conf": ["*.yaml", "*/*.yaml"]},
    entry_points={"console_scripts": ["sparse-fcmae=sparse_fcmae.cli:main"]},
)
