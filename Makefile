# Two commands on a fresh machine:  `make demo`  (the whole pipeline on the CPU demo)  and  `make test`.
# Both create .venv and install what they need the first time.
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint

install: $(STAMP)

# torch FIRST and pinned: 2.13.0 is a CPU build that the package index here already holds; an unpinned `torch`
# would pull a multi-GB CUDA build. GPU users: install your own torch, then `pip install -e .[qlora,gguf]`.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,qlora,gguf,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith run examples/sql-assistant/tunesmith.yaml --out runs/sql-assistant

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
