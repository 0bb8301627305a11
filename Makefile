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

.PHONY: demo test bench lint clean
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

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
