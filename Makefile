# Targets match the README. Everything installs into a local virtualenv (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (small, enough for tests and the tiny models); set TORCH="torch" for a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install app test browser lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

app: install
	$(VENV)/bin/blockstudio app

test: install browser
	$(PY) -m pytest -q

# The browser test drives Debian's Chromium through Playwright (installed by the test extra); Playwright's
# own browser download is not used. As root the package is installed here; otherwise the test says what
# to install and skips.
CHROMIUM ?= /usr/bin/chromium
browser: install
	@if [ ! -x "$(CHROMIUM)" ] && ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium is not installed (sudo apt-get install chromium); the browser test will be skipped"; \
		fi; \
	fi

lint: install
	$(VENV)/bin/ruff check pipelines studio tests bench app.py

# CPU check on the tiny models; on a CUDA GPU see bench/README.md (--model sdxl-random / flux-random).
bench: install
	OMP_NUM_THREADS=1 $(PY) bench/bench_blora.py --model tiny-sdxl --steps 20 --warmup 3 --repeats 2 --levers all --compile-backend aot_eager
	OMP_NUM_THREADS=1 $(PY) bench/bench_splitflux.py --model tiny-flux --steps 10 --warmup 3 --repeats 1 --levers all --compile-backend aot_eager

clean:
	rm -rf $(VENV) .pytest_cache
