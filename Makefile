# Every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/randkit: pyproject.toml setup.py src/randkit/_native/philox.c src/randkit/_native/patchpool.c src/randkit/_native/densemm.c
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray,bench]'
	touch $@

demo: $(BIN)/randkit
	$(BIN)/randkit cv examples/digits.yaml --out runs/digits-cv

test: $(BIN)/randkit
	$(BIN)/python -m pytest -q

bench: $(BIN)/randkit
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(BIN)/randkit
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
