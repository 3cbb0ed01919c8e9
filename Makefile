# The two commands of the README. Each one sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/testpress-sync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/testpress-sync          ## sync the bundled simulator into ./testpress-demo.db
	$(BIN)/testpress-sync demo

test: $(BIN)/testpress-sync          ## the whole test suite, SQLite and PostgreSQL
	$(BIN)/python -m pytest

# dlt, the reference the benchmark runs beside, lives in a venv of its own: its
# dependencies (rich, among others) would otherwise slow our own start-up down.
DLT_VENV := .venv-dlt
$(DLT_VENV)/bin/dlt:
	$(PYTHON) -m venv $(DLT_VENV)
	$(DLT_VENV)/bin/pip install --quiet --upgrade pip
	$(DLT_VENV)/bin/pip install --quiet 'dlt[sqlalchemy,postgres]>=1.0'

# (The bench byte-compiles the checkout itself first: bench.__main__.compile_checkout.)
bench: $(BIN)/testpress-sync $(DLT_VENV)/bin/dlt  ## the performance benchmark (issue #4 targets)
	$(BIN)/python -m bench --dlt-python $(DLT_VENV)/bin/python

lint: $(BIN)/testpress-sync          ## ruff and mypy
	$(BIN)/pip install --quiet -e '.[test,dev]'
	$(BIN)/ruff check sync schema tests bench
	$(BIN)/mypy sync schema

clean:
	rm -rf $(VENV) $(DLT_VENV) *.egg-info testpress-demo.db
