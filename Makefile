# `make demo` and `make test` are the README's two commands; both set up .venv first.
# CI (.ci/run) also runs `make test-latest` (the suite on the newest JAX, Python >= 3.12) and
# `make gpu-check` (every Pallas kernel compiled for H100 and A100 without a GPU).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

# The second JAX version: the newest jax/jaxlib/flax/optax/orbax the registry serves.
PYTHON_LATEST ?= $(shell tools/find_python.sh)
VENV_LATEST := .venv-latest
STAMP_LATEST := $(VENV_LATEST)/.installed-stamp
# Deviceless GPU compiles: jax plus the CUDA plugin of the same version, installed --no-deps.
VENV_GPUCHECK := .venv-gpucheck
STAMP_GPUCHECK := $(VENV_GPUCHECK)/.installed-stamp
GPU_CHECK_JOBS ?= 2

.PHONY: demo test test-latest lint bench gpu-check gpu-bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(STAMP_LATEST): pyproject.toml
	test -n "$(PYTHON_LATEST)" || { echo "make test-latest needs Python >= 3.12"; exit 1; }
	test -x $(VENV_LATEST)/bin/python || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install --quiet -e '.[dev]'
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade jax jaxlib flax optax orbax-checkpoint
	touch $(STAMP_LATEST)

$(STAMP_GPUCHECK): pyproject.toml
	test -n "$(PYTHON_LATEST)" || { echo "make gpu-check needs Python >= 3.12"; exit 1; }
	test -x $(VENV_GPUCHECK)/bin/python || $(PYTHON_LATEST) -m venv $(VENV_GPUCHECK)
	$(VENV_GPUCHECK)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_GPUCHECK)/bin/python -m pip install --quiet --upgrade jax
	version=$$($(VENV_GPUCHECK)/bin/python -c 'import jax; print(jax.__version__)'); \
	$(VENV_GPUCHECK)/bin/python -m pip install --quiet --no-deps \
		jax-cuda13-plugin==$$version jax-cuda13-pjrt==$$version \
		|| echo "no jax-cuda13-plugin $$version on the registry: gpu-check will skip"
	touch $(STAMP_GPUCHECK)

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/efflax reproduce --quick --out results

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	MPLBACKEND=Agg $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test-latest: $(STAMP_LATEST)
	$(VENV_LATEST)/bin/python -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
	MPLBACKEND=Agg $(VENV_LATEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

gpu-check: $(STAMP_GPUCHECK)
	JAX_PLATFORMS=cpu $(VENV_GPUCHECK)/bin/python tools/gpu_check.py --jobs $(GPU_CHECK_JOBS)

# On a machine with an NVIDIA GPU: the gpu tests and the attention and Monarch benchmarks,
# their tables written into BENCHMARKS.md (says so and stops where no GPU is present).
gpu-bench: $(STAMP)
	MPLBACKEND=Agg $(PY) tools/gpu_bench.py

bench: $(STAMP)
	@for module in $$(ls experiments/bench_*.py | xargs -n1 basename | sed 's/\.py$$//'); do \
		echo "=== $$module"; MPLBACKEND=Agg $(PY) -m experiments.$$module || exit 1; \
	done

clean:
	rm -rf results .pytest_cache
