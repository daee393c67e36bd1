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
comma := ,

.PHONY: venv build dev test demo bench wheel cuda-check emu-mutants cutlass gpu-check gpu-wheels clean

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

# The CUDA headers (CUTLASS from nvidia-cutlass) also serve tests/test_cuda_emulated.py, which
# runs the CUDA kernels on the CPU through tools/emu.
test: build $(VENV)/.cuda-tools-stamp
	cd tests && ../$(PY) -m pytest -q -ra $(PYTEST_ARGS) .

demo: build
	$(PY) examples/demo.py

bench: build
	$(PY) -m benchmarks --cpu-quick

# Compile gate for machines without a GPU: every CUDA kernel for sm_80 and sm_90a, ptxas
# resource report, static SASS counts (HMMA, LDSM, LDG, LDS, ...); writes
# build/cuda-check/report.json, and build/cuda-check/launch.json (every kernel launch at the
# reference shapes, from the launchers' plan functions, with H200 occupancy).
$(VENV)/.cuda-tools-stamp: $(VENV)/.deps-stamp
	$(PY) -m pip install -q nvidia-cutlass nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	@touch $@

cuda-check: $(VENV)/.cuda-tools-stamp
	$(PY) tools/cuda_check.py --archs "$(subst ;,$(comma),$(ARCHS))" --jobs $(JOBS)

# Mutation check of the kernels' synchronisation in the emulator: every __syncthreads()
# deleted and every cp_async_wait<N> shortened, one at a time, in a scratch copy of the
# sources (build/emu-mutants); each must fail the matching emulated tests (they import the
# package: the in-place `make dev` build when there is one, else the installed one).
# EMU_MUTANTS_ARGS: e.g. --only swa_fwd_kernel.cuh.
EMU_MUTANTS_JOBS ?= 2
EMU_MUTANTS_ARGS ?=
emu-mutants: build $(VENV)/.cuda-tools-stamp
	$(PY) tools/emu/mutants.py --jobs $(EMU_MUTANTS_JOBS) $(EMU_MUTANTS_ARGS)

# GPU gate (a GPU machine with torch CUDA and nvcc; no network): build for the local arch,
# run tests/test_*_cuda.py, short SWA benchmark vs FlexAttention -> benchmarks/results/.
# GPU_CHECK_ARGS=--dry-run prints the plan without a GPU.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# The wheels of flash-linear-attention (pure Python, Triton kernels) into .whl/ (ignored), for
# the benchmark peer on an offline GPU machine: tools/gpu_session.sh installs them from there.
FLA_VERSION ?= 0.6.0
gpu-wheels: $(VENV)/.deps-stamp
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl flash-linear-attention==$(FLA_VERSION) fla-core==$(FLA_VERSION)

# Copy the CuTe/CUTLASS headers into the checkout (third_party/, ignored) so an offline
# GPU machine can build from the checkout alone.
cutlass: $(VENV)/.cuda-tools-stamp
	$(PY) -c "import cutlass_library, os, shutil; src = os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'); [shutil.copytree(os.path.join(src, d), os.path.join('third_party/cutlass/include', d), dirs_exist_ok=True) for d in ('cute', 'cutlass')]"

# A wheel for exactly the CUDA architectures in ARCHS, into dist/, from a clean build tree,
# then its contents (SASS/PTX architectures, sizes). CPU-only when torch has no CUDA.
wheel: venv
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then \
	  echo "wheel: CUDA architectures $(ARCHS)"; else \
	  echo "wheel: the torch in $(VENV) has no CUDA: building a CPU-only wheel (ARCHS ignored)"; fi
	rm -rf build/wheel build/lib.* build/bdist.*
	RATTENTION_CUDA_ARCHS="$(ARCHS)" RATTENTION_BUILD_DIR=build/wheel MAX_JOBS=$(JOBS) \
	  $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	$(PY) python/rattention_ext/inspect_wheel.py --no-build-info "$$(ls -t dist/rattention_ext-*.whl | head -1)"

clean:
	rm -rf build dist *.egg-info python/rattention_ext/_C*.so python/rattention_ext/_jax_ffi.so
