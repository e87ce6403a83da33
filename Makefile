# gpuyard developer entry points. `make up` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
EXTRA  ?= cpu

.PHONY: install redis-server chromium up demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	touch $@

install: $(VENV)/.installed

# The local stack and the tests start a private redis-server; install it when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server with apt-get"; apt-get update -qq && apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install redis-server' (Debian/Ubuntu)" \
	         "or 'brew install redis' (macOS), then again."; exit 1; \
	  fi; }

# The dashboard's browser test drives Debian's chromium (Playwright cannot download its own browsers here).
chromium:
	@test -x /usr/bin/chromium || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium with apt-get"; apt-get update -qq && apt-get install -y -qq chromium; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium' (Debian/Ubuntu), then again."; exit 1; \
	  fi; }

up: install redis-server
	$(VENV)/bin/gpuyard up

demo: install
	$(VENV)/bin/gpuyard demo

test: install redis-server chromium
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: install
	$(PY) bench/trainer_overhead.py --rows 3000 --epochs 3 --backend tensorflow --gpu cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
