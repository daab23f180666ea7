# Two commands do all the set-up on a fresh machine:
#   make demo   - venv + install, a Ray head on 127.0.0.1, the broker from configs/resources.yaml,
#                 a reserve/release shown working
#   make test   - venv + install, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MERLIN_STATE_DIR ?= $(CURDIR)/build/generated/ray

.PHONY: setup tools demo test lint stop clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# Our sources are installed editable, so nothing compiled them: every `merlin` start would
	@# (PYTHONDONTWRITEBYTECODE keeps it from caching), a third of a CLI call's time.
	$(BIN)/python -m compileall -q broker targetgen executor
	touch $@

setup: $(VENV)/.installed

# promtool and prometheus (Debian package) for the metrics tests; installed when we may (root + apt).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    echo "installing Debian's prometheus package (promtool, prometheus) for the metrics tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; \
	    ($$SUDO systemctl disable --now prometheus || $$SUDO service prometheus stop) >/dev/null 2>&1 || true; \
	  else \
	    echo "note: promtool/prometheus are not installed: their tests will fail (apt-get install prometheus, or MERLIN_REQUIRE_TOOLS=0 to skip them)"; \
	  fi; }

demo: setup
	$(BIN)/merlin ray cluster start-local
	$(BIN)/merlin broker up --catalog configs/resources.yaml
	$(BIN)/merlin ray resources list
	@echo '--- alice reserves the U250 slot for 10 minutes'
	$(BIN)/merlin ray resources reserve firesim_u250 --holder alice --ttl 10m --json > build/demo-lease.json
	@echo '--- bob tries too, without waiting: busy (exit 5)'
	$(BIN)/merlin ray resources reserve firesim_u250 --holder bob; echo "(exit code $$?: 5 means busy; --wait would queue)"
	$(BIN)/merlin ray resources list
	@echo '--- alice releases it'
	$(BIN)/merlin ray resources release $$($(BIN)/python -c "import json; print(json.load(open('build/demo-lease.json'))['lease_id'])")
	$(BIN)/merlin broker status
	@echo '--- the metrics endpoint (what Prometheus scrapes)'
	$(BIN)/python -c "import urllib.request; text = urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=10).read().decode(); print('\n'.join(l for l in text.splitlines() if l.startswith(('merlin_broker_resource_up', 'merlin_broker_lease_grants_total', 'merlin_broker_leased_seconds_total'))))"
	$(BIN)/merlin ray events --since 10m
	@echo 'The broker keeps running. Stop it with: make stop'

test: setup tools lint
	$(BIN)/python -m pytest

# ruff (lint + format check) and mypy, configured in pyproject.toml; CI runs it with the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

stop:
	-$(BIN)/merlin broker down
	-$(BIN)/merlin ray cluster stop

clean: stop
	rm -rf build $(VENV)
