# rattention_ext — the two commands a user needs on a fresh machine:
#   make demo    forward + backward at a realistic size on the best backend, checked vs the reference
#   make test    the test suite (CPU everywhere; GPU tests run when CUDA is available)
# Both set up .venv/ (torch from the registry) and build the package into it.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: a CPU build here, the default (CUDA) build on a GPU machine's registry.
TORCH_SPEC ?= torch==2.13.0
JOBS ?= $(shell nproc)
ARCHS ?= 80;90a
PYTEST_ARGS ?=

.PHONY: venv build dev test demo bench wheel cuda-check gpu-check cutlass clean

$(VENV)/.deps-stamp: pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch first: keep a torch that is already there (e.g. a CUDA build on a GPU machine)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy pytest expecttest hypothesis pybind11 ninja "cmake>=3.24" setuptools wheel "jax[cpu]" matplotlib tqdm
	@touch $@

venv: $(VENV)/.deps-stamp

# Build and install the package into the venv (incremental: CMake tree in build/cmake).
build: venv
	MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -q .

# Development build: _C lands in python/rattention_ext/, use PYTHONPATH=python.
dev: venv
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: build
	cd tests && ../$(PY) -m pytest -q -ra $(PYTEST_ARGS) .

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) -m benchmarks --cpu-quick

# Compile-only CUDA check (no GPU, no torch): registers, spills, smem, MMA count per kernel.
# cuobjdump comes from the CUDA toolkit, else the small pip package nvidia-cuda-cuobjdump,
# installed into build/cuda-check/tools (not into the venv) when missing.
CHECK_PY := $(shell test -x $(PY) && echo $(PY) || echo python3)
cuda-check:
	@$(CHECK_PY) -c "import sys; sys.path.insert(0, 'tools'); import cuda_check; sys.exit(0 if cuda_check.find_cuobjdump() else 1)" || \
	  $(CHECK_PY) -m pip install -q --target build/cuda-check/tools nvidia-cuda-cuobjdump
	$(CHECK_PY) tools/cuda_check.py --jobs 2

# One prepared command for a machine with a GPU, torch (CUDA) and nvcc, no network:
# build for this GPU's arch only, run the GPU tests, short benchmark vs FlexAttention.
gpu-check:
	$(PY) tools/gpu_check.py

# Copy the CUTLASS/CuTe headers of the nvidia-cutlass pip package into third_party/ so an
# offline GPU machine can build from the checkout alone.
cutlass:
	@inc=$$($(CHECK_PY) -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))") && \
	  mkdir -p third_party/cutlass/include && rm -rf third_party/cutlass/include/cute third_party/cutlass/include/cutlass && \
	  cp -r $$inc/cute $$inc/cutlass third_party/cutlass/include/ && echo "CUTLASS headers copied from $$inc to third_party/cutlass/include"

clean:
	rm -rf build dist *.egg-info python/rattention_ext/_C*.so
