# Every target bootstraps its own virtual environment; nothing needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check soak bench screenshot clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: the main job, the sample catalog rehearsed against the built-in emulator; images land in
## out/catalog.emulated/images, the report in out/catalog.emulated/report/index.html
run: $(STAMP)
	$(VENV)/bin/batcher run samples/catalog.yaml --emulate

## screenshot: the sample catalog's report in Chromium, saved as docs/report.png (as root, installs
## Debian's chromium and fonts-noto-cjk when missing, so Chinese prompts are not boxes)
screenshot: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && { [ ! -x /usr/bin/chromium ] || ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; }; then \
		apt-get update -qq && apt-get install -y -qq chromium fonts-noto-cjk; fi
	$(VENV)/bin/batcher run samples/catalog.yaml --emulate --no-progress
	$(PY) docs/screenshot.py out/catalog.emulated docs/report.png

## test: the whole suite (unit, integration, acceptance); exit 5 (no tests collected) is a failure
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

## check: formatting, lint and strict typing
check: $(STAMP)
	$(VENV)/bin/ruff format --check batcher jobs tests bench
	$(VENV)/bin/ruff check batcher jobs tests bench
	$(VENV)/bin/mypy

## soak: the slow seeded fault soak with random kills
soak: $(STAMP)
	$(PY) -m pytest -m slow -q -s tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

## bench: every benchmark, ratios against baselines measured in the same run
bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) out build *.egg-info
