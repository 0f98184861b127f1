# Entry points for a fresh machine: `make demo` (set up + quick run), `make test` (the fast tier,
# no GLUE copy needed) and `make test-full` (everything; what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: here 2.13.0 is a CPU wheel on local disk, while an unpinned `torch` pulls a
# multi-GB CUDA build. Elsewhere choose the build, e.g. on a GPU machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
# The local GLUE copy beside the repo when present, else "" = the Hugging Face hub.
GLUE ?= $(if $(wildcard ../shared/data/glue/sst2/train.tsv),../shared/data/glue,)
# server-step-overlap=false: on a small CPU machine the sequential server step is the faster order.
DEMO_CONFIG ?= num-server-rounds=5 max-train-examples-per-client=500 max-eval-examples=400 \
	max-public-examples=500 teacher-pretrain-epochs=3 server-step-overlap=false

.PHONY: setup demo test test-full lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fedkdlora-run . --report --run-config "data-dir='$(GLUE)' $(DEMO_CONFIG)"

lint: setup
	$(VENV)/bin/ruff check .

# Two workers; tests that share a built fixture stay in one (tests/conftest.py), and so do the
# deployments (one after another: each starts a SuperLink and up to three SuperNodes). The full
# tier keeps the suite's order (tests/conftest.py `run_order`): the deployments start first.
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup

test: lint
	$(PYTEST) -m "not slow"

test-full: lint
	$(PYTEST) --no-loadscope-reorder

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
