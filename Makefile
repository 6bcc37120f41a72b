# wantrainer: make install | make test | make lint | make demo
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests tools bench

demo: install
	$(VENV)/bin/wantrainer demo $(DEMO_ARGS)

# Debian's chromium for the web UI's browser tests (skipped without it). Needs root (or sudo) and apt.
browser:
	@command -v chromium >/dev/null 2>&1 && echo "chromium present: $$(command -v chromium)" || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
