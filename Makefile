# gpuyard developer entry points. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
EXTRA  ?= cpu

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gpuyard demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
