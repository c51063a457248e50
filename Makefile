# The two commands of the README's quick start: `make run` and `make test`.
# Each creates the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

# __init__.py holds the version the installed metadata reports.
# `make run` and `make test` started together on a fresh clone: one makes the venv
# under a lock, the other waits for the lock and then finds the venv made (a second
# make of it at the same time, or over a running server, fails in pip).
FLOCK := $(shell command -v flock 2>/dev/null)
ifndef VENV_LOCKED
$(BIN)/.installed: pyproject.toml dynupdate/__init__.py
	@mkdir -p $(VENV)
	@$(if $(FLOCK),$(FLOCK) $(VENV)/.lock) $(MAKE) --no-print-directory VENV_LOCKED=1 $@
else
$(BIN)/.installed: pyproject.toml dynupdate/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@
endif

# Options for serve: make run ARGS="--host 127.0.0.1 --port 9443"
run: $(BIN)/.installed
	$(BIN)/dynupdate serve $(ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -n auto --dist worksteal --durations=15

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
