# sparse-fcmae: `make pretrain` and `make test` set everything up on a fresh machine, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparse-fcmae-setup
ARGS   ?=
SETUP_INPUTS := requirements.txt setup.py scripts/setup_env.sh scripts/install_minkowski.sh \
                scripts/patch_minkowski.py scripts/install_system_deps.sh

.PHONY: setup test pretrain clean check-cuda

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup_env.sh $(VENV)
	touch $@

test: setup
	$(PY) -m pytest -q tests

# Short CPU pretraining on the embedded digits; pass hydra overrides with ARGS="optim.epochs=10 ...".
pretrain: setup
	$(VENV)/bin/sparse-fcmae pretrain $(ARGS)

# Compile the CUDA kernels (csrc/*.cu) for sm_90 with the machine's nvcc; no GPU needed (CI runs it).
check-cuda:
	bash scripts/check_cuda.sh $(if $(wildcard $(PY)),$(PY),python3)

clean:
	rm -rf build *.egg-info .pytest_cache
