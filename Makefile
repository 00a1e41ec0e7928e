# Two commands set up a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser quickstart test test-fast test-compat clean

install: $(STAMP) browser

# Pins the tested CPU set (torch 2.13.0 CPU build) and installs prefopt in editable mode.
$(STAMP): setup.cfg pyproject.toml requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Chromium and its driver from Debian's packages, for the feedback page's browser test
# (tests/test_annotate_browser.py): only as root and only where $(CHROMIUM) is missing; without them that test
# skips and says why. A failed apt-get (no network) is a warning, not a failed install.
CHROMIUM ?= chromium
browser:
	@if command -v $(CHROMIUM) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "warning: apt-get could not install chromium; the browser test will be skipped"; \
	else echo "note: no $(CHROMIUM); run make install as root (or apt-get install chromium chromium-driver)"; fi

# The whole pipeline on a tiny model, on CPU, in minutes.
quickstart: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/prefopt run experiments/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

# Everything but the end-to-end training runs: a quick loop while developing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The fast tests again on the GPU set's transformers (5.17; vLLM 0.31 needs < 5.18), overlaid on the CPU venv:
# the code is tested on both versions it claims. CI runs this after `make test`.
COMPAT := .venv-compat
$(COMPAT)/.installed: requirements/compat-tf517.txt $(STAMP)
	rm -rf $(COMPAT)
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT) -r requirements/compat-tf517.txt
	touch $@

test-compat: $(COMPAT)/.installed
	PYTHONPATH=$(CURDIR)/$(COMPAT) $(BIN)/python -c "import transformers as t; print('test-compat: transformers', t.__version__, 'from', t.__file__)"
	PYTHONPATH=$(CURDIR)/$(COMPAT) $(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf runs wandb build *.egg-info
