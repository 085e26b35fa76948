# clawback: the single entry point for developers and CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/clawback/v1/*.proto)

.PHONY: setup demo test test-fast lint typecheck importlint protos protos-check bench bench-quick bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/scripts/system-deps.sh
	@sh deploy/scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m deploy.demo

# CI runs exactly this (.ci/run). pytest's exit 5 (no tests collected) fails the target like any other error.
test: setup lint typecheck
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not integration"

lint: setup
	$(BIN)/ruff check core agent coordinator tests bench deploy
	$(BIN)/ruff format --check core agent coordinator tests bench deploy

typecheck: setup
	$(BIN)/mypy core agent coordinator

importlint: setup
	$(BIN)/lint-imports

# Regenerate the committed gRPC/protobuf code (and .pyi stubs) from protos/.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. $(PROTOS)

# The benchmark's peers: restic (apt-get) and borgbackup (pip, built from source), installed only if missing.
bench-deps: setup
	$(BIN)/python -m bench.peers --install

bench: bench-deps
	$(BIN)/python -m bench.run --json bench/results/latest.json

bench-quick: bench-deps
	$(BIN)/python -m bench.run --quick

# The coordinator at scale: MissingBlobs against a 10M-entry index, 50 agents uploading at once (no peers needed).
.PHONY: bench-scale
bench-scale: setup
	$(BIN)/python -m bench.scale --json bench/results/scale.json

# The agent's peak RSS into a fresh repository and into one holding 10x the data (no peers needed; ~5-8 min, ~8 GB).
.PHONY: bench-rss
bench-rss: setup
	$(BIN)/python -m bench.rss --json bench/results/rss.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
