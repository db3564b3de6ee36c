# make demo: create .venv, install, run the main job (manpp compare on the bundled digits data)
# make test: create .venv if needed, install, run the fast tests (the tier every change runs)
# make test-all: the same, plus the slow tier (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/manpp compare --out runs/demo --overwrite --json runs/demo/results.json

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
