# PipeWeaver developer entry points. Everything the project needs is installed from here (venv + pip: uv would
# ignore the local CPU torch wheel and download a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: install lint typecheck proto proto-check buf-lint pytest test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[server,client,dev]'
	bash scripts/install_prometheus.sh
	PYTHON=$(BIN)/python bash scripts/install_kubectl.sh $(BIN)
	touch $(STAMP)

lint: install
	$(BIN)/ruff check pipeweaver tests benchmarks
	$(BIN)/ruff format --check pipeweaver tests benchmarks

typecheck: install
	$(BIN)/mypy

proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/gen_proto.sh

# Regenerating the wire code must give exactly what is committed.
proto-check: proto
	git diff --exit-code -- pipeweaver/v1
	@test -z "$$(git status --porcelain -- pipeweaver/v1)" || (git status --porcelain -- pipeweaver/v1; echo "untracked generated files"; exit 1)

buf-lint: install
	$(BIN)/buf lint

pytest: install
	$(BIN)/pytest -q

test: lint typecheck proto-check buf-lint pytest

demo: install
	$(BIN)/pipeweaver demo

bench: install
	$(BIN)/pipeweaver bench --workload vlm-s --batches 20

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
