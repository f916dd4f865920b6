# Every target bootstraps its own virtual environment; nothing needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test check soak bench screenshot clean

$(STAMP): pyproject.toml setup.py batcher/_speedups.c
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

## test: the whole suite (unit, integration, acceptance) in two parts: the tests that time
## nothing, TEST_JOBS at a time (pytest-xdist; TEST_JOBS=0 runs them in one process), then the
## tests marked serial (rates against a quota, elapsed time, a PostgreSQL restart) alone, on a
## quiet machine. Exit 5 (no tests collected) in either part is a failure.
TEST_JOBS ?= 4
test: $(STAMP)
	@$(PY) -m pytest -m "not slow and not serial" -n $(TEST_JOBS) --dist worksteal -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; \
	echo "--- the serial tests, alone"; \
	$(PY) -m pytest -m "not slow and serial" -q tests; rc2=$$?; \
	if [ $$rc2 -eq 5 ]; then echo "pytest collected no serial tests: failing" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$rc2

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
