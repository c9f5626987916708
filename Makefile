# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install install-dev test test-faults demo math-demo tabular bench clean

install: $(VENV)/.runtime-installed
install-dev: $(VENV)/.dev-installed

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "qsharp_jax needs Python >= 3.11 (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)

# Stamps make a repeated install a no-op until a requirements file or pyproject.toml changes.
$(VENV)/.runtime-installed: requirements.txt pyproject.toml | $(PY)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PIP) -r requirements-dev.txt
	touch $@

PYTEST_WORKERS ?= auto

test: install-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

# every kill point of the fault-injection suite (make test runs a representative chain of them)
test-faults: install-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m faults tests/test_faults.py

# the star-graph experiment on the paper's G(2, 5) end to end (π_ref pretraining, Q♯, CD, REINFORCE, DPO,
# RPO) into runs/demo (about 30 min on 2 cores; README)
demo: install
	$(PY) -m experiments.star_graph experiments/star_graph/demo.yaml

# the CPU math demo: π_ref / CD / Q♯ on carry-forgetting addition problems into runs/math_demo (~13 min)
math-demo: install
	$(PY) -m experiments.math experiments/math/demo.yaml

# the exact tabular check of Q♯ against π* (seconds)
tabular: install
	$(PY) -m experiments.tabular experiments/tabular/config.yaml

bench: install-dev
	$(PY) -m experiments.bench.fit_bench
	$(PY) -m experiments.bench.rollout_bench
	$(PY) -m experiments.bench.math_bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
