# Quick start: `make demo` and `make test` on a fresh clone. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's requirements change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,cli,plot,triton]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mha demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Every test, the slow ones (long hypothesis runs) included: about a minute on 2 cores.
test: lint
	$(BIN)/python -m pytest -n 2 -q

# The edit-run loop: everything but the cases marked slow.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

bench: $(STAMP)
	$(BIN)/mha bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
