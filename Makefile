# Two commands on a fresh machine:  `make demo`  (the whole pipeline on the CPU demo)  and  `make test`.
# Both create .venv and install what they need the first time.
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# llama-cpp-python compiles llama.cpp on install. Portable AVX2 flags, not the default -march=native: a CPU that
# advertises Intel AMX inside a VM that does not enable it dies with SIGILL in llama.cpp's AMX kernels for quantized
# GGUFs. (--no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags.)
# `tunesmith setup-gguf` then fetches llama.cpp's HF->GGUF converter of the same version into $$TUNESMITH_HOME.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install demo test lint

install: $(STAMP)

# torch FIRST and pinned: 2.13.0 is a CPU build that the package index here already holds; an unpinned `torch`
# would pull a multi-GB CUDA build. GPU users: install your own torch, then `pip install -e .[qlora,gguf]`.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	# Triton, which torch's CPU build does not bring: the CPU tests run the LoRA adapters' dropout kernels in its
	# interpreter (3.9: earlier interpreters fail on numpy 2's scalars). GPU users have the one their torch pins.
	$(BIN)/python -m pip install -q triton==3.9.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(BIN)/python -m pip install -q -e ".[dev,qlora,gguf,serve]"
	$(BIN)/tunesmith setup-gguf
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith run examples/sql-assistant/tunesmith.yaml --out runs/sql-assistant

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
