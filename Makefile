# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/efflax reproduce --quick --out results

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	MPLBACKEND=Agg $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

bench: $(STAMP)
	@for module in $$(ls experiments/bench_*.py | xargs -n1 basename | sed 's/\.py$$//'); do \
		echo "=== $$module"; MPLBACKEND=Agg $(PY) -m experiments.$$module || exit 1; \
	done

clean:
	rm -rf results .pytest_cache
