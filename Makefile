# Two commands: `make test` (CI; `make test-fast` for the inner loop) and `make demo`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpolens-installed

.PHONY: test test-fast demo install browser bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A bare `torch` requirement can resolve to a multi-GB CUDA build: take the CPU build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The report test opens report.html in headless Chromium (Debian's chromium package).
browser:
	command -v chromium >/dev/null || { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }

test: $(STAMP) browser
	$(VENV)/bin/pytest -q

# The inner loop: no network, no Chromium, no subprocess CLI runs (under 2 minutes on 2 cores).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/dpolens assets fetch gemma-3-270m
	$(VENV)/bin/dpolens assets fetch jigsaw-lstm
	$(VENV)/bin/dpolens run configs/quickstart.yaml
	$(VENV)/bin/dpolens report runs/quickstart

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
