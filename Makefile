# fastperc developer entry points. `make test` works on a machine that has only python3 and pip.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.fastperc-installed
# make cuda-check: compile every CUDA source in csrc/ for sm_80 and sm_90, compile only, against
# the torch headers of the venv's (CPU) wheel; objects go to build/cuda-check/.
NVCC            ?= nvcc
CUDA_CHECK_DIR  ?= build/cuda-check
CUDA_SOURCES    := $(sort $(wildcard csrc/*.cu csrc/*.cpp))
CUDA_HEADERS    := $(wildcard csrc/*.h csrc/*.cuh)
CUDA_CHECK_OBJS := $(patsubst csrc/%,$(CUDA_CHECK_DIR)/%.o,$(CUDA_SOURCES))
# Two compile jobs unless make was given its own -j (read when the recipe runs).
CUDA_CHECK_JOBS  = $(if $(filter -j%,$(MAKEFLAGS)),,-j2)
# make triton-check: compile every Triton kernel the launchers launch for sm_90 (the H200),
# compile only, no GPU, with the launchers' GPU configs (tools/triton_aot_check.py); the
# tests run the kernels in the interpreter, which compiles nothing. Uses Triton's cache.

.PHONY: test demo bench clean cuda-check cuda-check-objects triton-check

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: $(STAMP) cuda-check triton-check
	$(PY) -m pytest
	$(PY) -m pytest benchmarks --benchmark-disable -q

# The main job, small: generated data, a short CPU training run, a stylized sample -> demo_out/.
demo: $(STAMP)
	$(PY) -m fastperc.commands.demo --out demo_out

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

cuda-check: $(STAMP)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  flags="$$($(PY) fastperc/_cuda_ext.py --check-flags)" && \
	  $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) $(CUDA_CHECK_JOBS) cuda-check-objects CUDA_CHECK_FLAGS="$$flags"; \
	else \
	  echo "cuda-check: skipped, $(NVCC) not found (the CUDA sources in csrc/ were not compiled)"; \
	fi

cuda-check-objects: $(CUDA_CHECK_OBJS)

triton-check: $(STAMP)
	@if $(PY) -c "import triton" >/dev/null 2>&1; then \
	  $(PY) tools/triton_aot_check.py; \
	else \
	  echo "triton-check: skipped, triton not installed (the Triton kernels were not compiled)"; \
	fi

$(CUDA_CHECK_DIR)/%.o: csrc/% $(CUDA_HEADERS) fastperc/_cuda_ext.py $(STAMP)
	@mkdir -p $(@D)
	$(NVCC) $(CUDA_CHECK_FLAGS) -c $< -o $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
