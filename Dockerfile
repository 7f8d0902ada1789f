# GPU image for sparse-fcmae pretraining: CUDA 13.0 toolkit (nvcc), PyTorch 2.14.1 (pinned in
# requirements.txt, CUDA 13.0 wheels), MinkowskiEngine 0.5.4 built with CUDA, this package with its
# CUDA kernels. Every install step calls a script that CI runs too (scripts/install_system_deps.sh, setup_env.sh).
#   docker build -t sparse-fcmae .
#   docker run --gpus all -v /data:/data sparse-fcmae pretrain data=imagefolder data.root=/data/train
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

# No GPU is visible while the image builds: force the CUDA builds and name the GPU generations
# (A100, RTX 30/40, H100, B200, RTX 50 + PTX for newer ones).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPARSE_FCMAE_CLEAN_APT=1 \
    SPARSE_FCMAE_CACHE=/root/.cache/sparse-fcmae \
    ME_CUDA=1 \
    FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    PATH=/opt/venv/bin:${PATH}

WORKDIR /opt/sparse-fcmae

# Compiler, Python headers/venv and OpenBLAS: a layer of its own, rebuilt only when the script changes.
COPY scripts/install_system_deps.sh scripts/
RUN bash scripts/install_system_deps.sh

# Pinned Python dependencies and MinkowskiEngine (CUDA build; its wheel is also kept in a build cache) in
# /opt/venv: a layer that changes only with requirements.txt or the install scripts, not with the code.
COPY requirements.txt ./
COPY scripts/setup_env.sh scripts/install_minkowski.sh scripts/fetch_minkowski.sh \
     scripts/patch_minkowski.py scripts/patch_minkowski_cuda.py scripts/
RUN --mount=type=cache,target=/root/.cache/sparse-fcmae \
    SPARSE_FCMAE_DEPS_ONLY=1 bash scripts/setup_env.sh /opt/venv

# This package with its CUDA kernels (the same script: the steps above find everything installed).
COPY . .
RUN bash scripts/setup_env.sh /opt/venv

WORKDIR /workspace
# Any uid may run the image (docker run --user "$(id -u):$(id -g)": files in mounted folders are then the
# caller's): a HOME and a working folder every uid can write, for the caches of torch, triton, matplotlib, wandb.
RUN chmod 1777 /workspace && mkdir -m 1777 /home/sparse-fcmae
ENV HOME=/home/sparse-fcmae
ENTRYPOINT ["sparse-fcmae"]
CMD ["--help"]
