# Every target bootstraps .venv itself, so a fresh machine needs only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo run test lint unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gpuwarden.cli.demo

run: $(STAMP)
	$(BIN)/gpuwarden run --config $${GPUWARDEN_CONFIG:-config.example.toml}

lint: $(STAMP)
	$(BIN)/ruff check daemon tests deploy
	$(BIN)/ruff format --check daemon tests deploy
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint unit

bench: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/bench --timeout=600 -s

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info .pytest_cache .mypy_cache .ruff_cache
