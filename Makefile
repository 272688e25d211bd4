# Every target bootstraps .venv itself: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test check bench lint clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision first, pinned: these releases lie on this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mixer pretrain

# The whole suite: the import contracts (pyproject.toml), then every test.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q

# The inner loop, under 3 minutes on 2 cores: lint, the import contracts, the tests not marked slow.
check: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/mixer benchmark

lint: $(STAMP)
	$(BIN)/ruff check src tests

# On a machine with a CUDA GPU: the GPU tests, the benchmark and the GPU input pipeline in at most
# 8 minutes (benchmarks/gpu_check.py); report.md and gpu-check.json go to $$GPU_CHECK_DIR. It runs on
# that machine's own python3 and torch (GPU_PYTHON=.venv/bin/python for ours); what its image lacks
# comes from .whl/. Without CUDA: one line, exit status 2.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# .whl/: the packages we need that a GPU machine's image may lack or hold in other versions, at this
# .venv's versions; carry the folder there (it reaches no registry). Pure-Python ones are built here;
# the compiled ones (typer needs pydantic, whose core is compiled) are fetched for that machine's
# Python (GPU_PY) and platform.
GPU_WHEELS := hydra-core omegaconf antlr4-python3-runtime hydra-submitit-launcher submitit webdataset \
              braceexpand torchdata mlxtend timm typer annotated-doc shellingham click rich pydantic \
              annotated-types typing-inspection typing-extensions
GPU_COMPILED_WHEELS := pydantic-core
GPU_PY ?= 3.12
GPU_PLATFORM ?= manylinux_2_17_x86_64
# The installed version of each package named: pip freeze writes some names with _ for -.
pinned = $(BIN)/pip freeze | grep -i -E '^($(shell echo $(subst -,[-_],$(1)) | tr ' ' '|'))=='
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	$(call pinned,$(GPU_WHEELS)) > .whl/requirements.txt
	$(BIN)/pip wheel -q --no-deps -r .whl/requirements.txt -w .whl
	@if ls .whl/*.whl | grep -v -- '-none-any.whl$$'; then echo "gpu-wheels: not pure Python (above)" >&2; exit 1; fi
	$(call pinned,$(GPU_COMPILED_WHEELS)) > .whl/compiled.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --platform $(GPU_PLATFORM) \
	    -r .whl/compiled.txt -d .whl
	@test $$(cat .whl/*.txt | wc -l) -eq $(words $(GPU_WHEELS) $(GPU_COMPILED_WHEELS)) || \
	    { echo "gpu-wheels: a package named is not installed in $(VENV)" >&2; exit 1; }
	@test $$(ls .whl/*.whl | wc -l) -eq $$(cat .whl/*.txt | wc -l) || { echo "gpu-wheels: a wheel is missing" >&2; exit 1; }
	@ls .whl/*.whl | wc -l | xargs echo "gpu-wheels: wheels in .whl/:"

clean:
	rm -rf $(VENV) runs
