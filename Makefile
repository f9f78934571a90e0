# On a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIN    := -c constraints/tools.txt -c constraints/torch-2.13.txt

# The second torch version CI tests (the top of the declared range).
VENV14  := .venv-torch2.14
STAMP14 := $(VENV14)/.installed
PIN14   := -c constraints/tools.txt -c constraints/torch-2.14.txt

.PHONY: demo test test-slow test-torch2.14 lint docs sdist-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's requirements change.
$(STAMP): $(BIN)/python pyproject.toml constraints/tools.txt constraints/torch-2.13.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIN) -e '.[test,plot,triton,docs]' mypy build
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mha demo

# ruff, then mypy with the settings in pyproject.toml ([tool.mypy]: src/mha, untyped definitions disallowed).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every test but the long randomised runs (marked slow): under 3 minutes on 2 cores.
test: lint
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# The long randomised runs alone.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m slow

$(VENV14)/bin/python:
	$(PYTHON) -m venv $(VENV14)

$(STAMP14): $(VENV14)/bin/python pyproject.toml constraints/tools.txt constraints/torch-2.14.txt
	$(VENV14)/bin/python -m pip install --quiet --upgrade pip
	$(VENV14)/bin/python -m pip install --quiet $(PIN14) -e '.[test,plot]'
	touch $(STAMP14)

# The same tests as `make test` on torch 2.14.1.
test-torch2.14: $(STAMP14)
	$(VENV14)/bin/python -m pytest -n 2 -q -m "not slow"

# The API reference and guides, HTML in docs/_build/html; any warning fails the build.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Build the sdist, unpack it elsewhere and run its own tests against it.
sdist-test: $(STAMP)
	rm -rf dist build/sdist-test
	$(BIN)/python -m build --sdist --outdir dist .
	mkdir -p build/sdist-test
	tar -xzf dist/mha-*.tar.gz -C build/sdist-test
	cd build/sdist-test/mha-* && PYTHONPATH=src $(CURDIR)/$(BIN)/python -m pytest -n 2 -q -m "not slow" -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/mha bench

clean:
	rm -rf $(VENV) $(VENV14) build dist src/*.egg-info docs/_build .pytest_cache .ruff_cache .mypy_cache .hypothesis
