# Two commands do everything: `make run` (train on the bundled X-rays, then serve) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export BENTOML_DO_NOT_TRACK := true

.PHONY: run train test lint clean

$(STAMP): requirements.txt pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	uv pip install --quiet --python $(BIN)/python -r requirements.txt
	uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

## make run: seed the local store with the bundled sample, train, evaluate and push a model
run: train

train: $(STAMP)
	$(BIN)/python -m xray upload-data data/sample
	$(BIN)/python -m xray train --config configs/config.yaml

## make test: the whole test suite (CI runs exactly this)
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf artifacts/*/ store bentoml_home .pytest_cache
