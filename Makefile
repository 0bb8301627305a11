# Every target creates .venv when it is missing and installs what it needs into it: the core
# package plus the extras below, with the exact torch/torchvision of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALL_INPUTS := pyproject.toml setup.py constraints.txt src/randkit/_native/philox.c

# Extras per target (an empty set is the core install).
EXTRAS_demo := report
EXTRAS_test := dev,serve,report,ray,bench,lightning,metrics,onnx
EXTRAS_bench := bench,serve
EXTRAS_lint := dev

.PHONY: demo test bench lint clean tools mlserver-env postgres chromium
.PRECIOUS: $(VENV)/.installed-%

# One stamp per set of extras; a change to the package metadata or the kernel reinstalls.
$(VENV)/.installed-%: $(INSTALL_INPUTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS_$*)]'
	touch $@

# The full development install (every extra), as `make test` uses.
$(BIN)/randkit: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(BIN)/randkit cv examples/digits.yaml --out runs/digits-cv

test: $(VENV)/.installed-test tools postgres chromium
	$(BIN)/python -m pytest -q -n 2

# PostgreSQL's server binaries, with which tests/test_serve_ledger.py starts a throwaway server
# of its own: Debian's postgresql, installed here when no initdb is found and running as root.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		[ "$$(id -u)" != 0 ] || (apt-get update -qq && apt-get install -y -qq postgresql)

# Headless Chromium, with which tests/test_report_pages.py screenshots every kind of report
# page: Debian's chromium, installed here when none is found and running as root (the test
# skips, saying why, without one; RANDKIT_CHROMIUM names another browser binary).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		command -v google-chrome >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium)

# Triton's perf_analyzer, which the server's load tests run: the binary that tritonclient
# 2.34.0's manylinux wheel ships, in a venv of its own so that .venv keeps its newer
# tritonclient. It needs libcudart (pip's nvidia-cuda-runtime-cu12, found through the
# wrapper .tools/perf_analyzer) and libb64 (Debian's libb64-0d: installed here when missing
# and running as root; otherwise install it yourself).
PERF_VENV := .tools/perf
tools: .tools/perf_analyzer
	@ldconfig -p | grep -q libb64.so.0d || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq libb64-0d)

.tools/perf_analyzer:
	test -d $(PERF_VENV) || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install --quiet --no-deps 'tritonclient==2.34.0' \
		'nvidia-cuda-runtime-cu12>=12,<13'
	lib=$$(echo $(CURDIR)/$(PERF_VENV)/lib/python3*/site-packages/nvidia/cuda_runtime/lib); \
	printf '#!/bin/sh\nLD_LIBRARY_PATH="%s$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "%s" "$$@"\n' \
		"$$lib" "$(CURDIR)/$(PERF_VENV)/bin/perf_analyzer" > $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@

bench: $(VENV)/.installed-bench
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# MLServer 1.7.1, serve_load.py's peer, in a venv of its own (uvloop 0.21: with 0.23 its worker
# restarts in a loop); torch and randkit come from .venv through a .pth file read after its
# own site-packages. serve_load.py makes it on first use too.
mlserver-env: $(VENV)/.installed-bench
	$(BIN)/python -c "import sys; sys.path.insert(0, 'benchmarks'); \
		from _serve_mlserver import ensure_env; sys.exit(ensure_env())"

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .tools runs .pytest_cache .ruff_cache
