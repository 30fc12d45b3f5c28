# Targets match the README. Everything installs into a local virtualenv (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (small, enough for tests and the tiny models); set TORCH="torch" for a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install app test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

app: install
	$(VENV)/bin/blockstudio app

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check pipelines studio tests bench app.py

bench: install
	$(PY) bench/bench_blora.py
	$(PY) bench/bench_splitflux.py

clean:
	rm -rf $(VENV) .pytest_cache
