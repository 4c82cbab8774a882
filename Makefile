# `make demo` and `make test` are the README's two commands; both set up .venv first.
# CI (.ci/run) also runs the pinned second-JAX suite and the compile-only accelerator checks.
# Every venv installs from a constraints file in constraints/ (pinned: the same clone gives the
# same answer next month); `make test-newest` is the one target that installs the newest
# releases, and it reports what moved without failing (CONTRIBUTING.md, "Moving the pins").
PYTHON ?= python3
PYTHON_LATEST ?= $(shell tools/find_python.sh)
PYTEST_WORKERS ?= 2
GPU_CHECK_JOBS ?= 2
PIP_QUIET := --quiet --disable-pip-version-check

# Every venv installs with uv (pinned), bootstrapped by the venv's own pip: the same pinned sets as
# pip, in about a third of the time (parallel downloads and bytecode compiles; a fresh .venv took
# 46 s with pip, 16 s with uv and an empty uv cache). --compile-bytecode as pip does: without it,
# where PYTHONDONTWRITEBYTECODE is set, every process compiles JAX's modules again (`make demo`
# took 54 s longer). `$(call venv,DIR,PYTHON)` makes DIR with uv in it; `$(call uv,DIR)` installs.
UV_VERSION := 0.13.10
venv = test -x $(1)/bin/uv || { $(2) -m venv $(1) && $(1)/bin/python -m pip install $(PIP_QUIET) uv==$(UV_VERSION); }
uv = $(1)/bin/uv pip install --quiet --compile-bytecode --python $(1)/bin/python

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Python 3.11: the documentation toolchain and the wheel build (constraints/docs.txt on py311.txt).
VENV_DOCS := .venv-docs
STAMP_DOCS := $(VENV_DOCS)/.installed-stamp
# Python 3.12: the newest JAX set known to pass (constraints/py312.txt).
VENV_LATEST := .venv-latest
STAMP_LATEST := $(VENV_LATEST)/.installed-stamp
# Python 3.12: compile-only accelerators (libtpu for TPU slices, the CUDA plugin for GPUs).
VENV_XLA := .venv-xla
STAMP_XLA := $(VENV_XLA)/.installed-stamp
# Python 3.12: the CUDA plugin at the newest pinned JAX (gpu-check on a second JAX version).
VENV_GPUCHECK := .venv-gpucheck
STAMP_GPUCHECK := $(VENV_GPUCHECK)/.installed-stamp

.PHONY: demo test test-latest test-newest lint bench gpu-check tpu-check gpu-bench clean pins \
	plan-env plan-check plans docs wheel-check

$(STAMP): pyproject.toml constraints/py311.txt
	$(call venv,$(VENV),$(PYTHON))
	$(call uv,$(VENV)) -c constraints/py311.txt -e '.[dev]'
	touch $(STAMP)

$(STAMP_DOCS): pyproject.toml constraints/py311.txt constraints/docs.txt
	$(call venv,$(VENV_DOCS),$(PYTHON))
	$(call uv,$(VENV_DOCS)) -c constraints/py311.txt -c constraints/docs.txt -e '.[docs]'
	touch $(STAMP_DOCS)

$(STAMP_LATEST): pyproject.toml constraints/py312.txt
	test -n "$(PYTHON_LATEST)" || { echo "make test-latest needs Python >= 3.12"; exit 1; }
	$(call venv,$(VENV_LATEST),$(PYTHON_LATEST))
	$(call uv,$(VENV_LATEST)) -c constraints/py312.txt -e '.[dev]'
	touch $(STAMP_LATEST)

$(STAMP_XLA): pyproject.toml constraints/xla.txt
	test -n "$(PYTHON_LATEST)" || { echo "the compile-only checks need Python >= 3.12"; exit 1; }
	$(call venv,$(VENV_XLA),$(PYTHON_LATEST))
	$(call uv,$(VENV_XLA)) -c constraints/xla.txt -e '.[dev,tpu]'
	$(call uv,$(VENV_XLA)) --no-deps -c constraints/xla.txt \
		jax-cuda13-plugin jax-cuda13-pjrt
	touch $(STAMP_XLA)

$(STAMP_GPUCHECK): constraints/gpucheck.txt constraints/py312.txt
	test -n "$(PYTHON_LATEST)" || { echo "make gpu-check needs Python >= 3.12"; exit 1; }
	$(call venv,$(VENV_GPUCHECK),$(PYTHON_LATEST))
	$(call uv,$(VENV_GPUCHECK)) -c constraints/gpucheck.txt jax
	$(call uv,$(VENV_GPUCHECK)) --no-deps -c constraints/gpucheck.txt \
		jax-cuda13-plugin jax-cuda13-pjrt
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

# Every Pallas GPU kernel compiled for H100 and A100 on both pinned py3.12 JAX versions.
gpu-check: $(STAMP_GPUCHECK) $(STAMP_XLA)
	JAX_PLATFORMS=cpu $(VENV_GPUCHECK)/bin/python tools/gpu_check.py --jobs $(GPU_CHECK_JOBS)
	JAX_PLATFORMS=cpu $(VENV_XLA)/bin/python tools/gpu_check.py --jobs $(GPU_CHECK_JOBS) --no-write

# Every Pallas Mosaic TPU kernel compiled for TPU v5e, v5p and v6e (libtpu's compile-only
# devices, no TPU), a sharded v5e:2x4 step, and the tpu-check section of BENCHMARKS.md.
tpu-check: $(STAMP_XLA)
	JAX_PLATFORMS=cpu $(VENV_XLA)/bin/python tools/tpu_check.py

# `efflax plan` compiles for TPU slices and GPU hosts without them: its toolchain is .venv-xla.
plan-env: $(STAMP_XLA)
	@echo "plan toolchain ready: JAX_PLATFORMS=cpu $(VENV_XLA)/bin/efflax plan --target v5e-8"

# tests/test_plan.py on that toolchain; a compile test that would skip fails here instead.
plan-check: $(STAMP_XLA)
	JAX_PLATFORMS=cpu EFFLAX_REQUIRE_PLAN_TARGETS=1 MPLBACKEND=Agg $(VENV_XLA)/bin/python -m pytest \
		-q -p no:cacheprovider tests/test_plan.py --durations=5

# Not in CI (about an hour on 2 cores): the reference plans, then the "plans" section of
# BENCHMARKS.md and its plots (tools/reference_plans.py; finished plans are kept and skipped).
plans: $(STAMP_XLA)
	JAX_PLATFORMS=cpu $(VENV_XLA)/bin/python tools/reference_plans.py
	JAX_PLATFORMS=cpu MPLBACKEND=Agg $(VENV_XLA)/bin/python tools/reference_plans.py --write

# The documentation site (docs/, Sphinx + MyST): warnings are errors, and every ```{doctest}```
# example of every page runs (CONTRIBUTING.md, "Documentation: why Sphinx").
docs: $(STAMP_DOCS)
	rm -rf docs/_build
	MPLBACKEND=Agg $(VENV_DOCS)/bin/sphinx-build -W --keep-going -q -d docs/_build/doctrees -b html docs docs/_build/html
	MPLBACKEND=Agg $(VENV_DOCS)/bin/sphinx-build -W --keep-going -q -d docs/_build/doctrees -b doctest docs docs/_build/doctest
	@echo "docs: docs/_build/html/index.html"

# The wheel as a user gets it: built, installed into a clean venv outside the repository
# (with constraints/py311.txt), and the README quickstart run there.
wheel-check: $(STAMP_DOCS)
	PYTHON="$(PYTHON)" tools/wheel_check.sh $(VENV_DOCS)/bin/python

# Not part of .ci/run: the newest releases of everything, and a report of what that changes
# (versions vs the pins, failing tests, new spills). Never fails; read its report.
test-newest:
	PYTHON_LATEST="$(PYTHON_LATEST)" tools/newest_report.sh

# Writes constraints/*.txt anew from venvs built with the newest releases (then run .ci/run).
pins:
	PYTHON_LATEST="$(PYTHON_LATEST)" tools/newest_report.sh --write-pins

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
