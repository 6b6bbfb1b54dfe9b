# drivesplat — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP   = $(VENV)/.installed

.PHONY: setup run demo test lint bench clean

# Idempotent: rebuilds only when pyproject.toml changed or the venv is missing.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pin torch first: an unpinned torch requirement would pull the CUDA build and
	# several GB of CUDA packages; 2.13.0 resolves to the local CPU wheel here.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev,waymo,worker,postgres]"
	# Waymo's protobuf definitions only: the wheel pins TensorFlow, which we never import.
	$(BIN)/python -m pip install --quiet --no-deps "waymo-open-dataset-tf-2-12-0==1.6.7"
	touch $(STAMP)

# The HTTP service on embedded defaults (./data, SQLite, in-process workers); docs at /docs.
run: setup
	$(BIN)/drivesplat serve

# Synthesise a log, upload it to the API (a running one on :8000, else one it starts),
# follow the job, save renders to data/service-demo.
demo: setup
	$(BIN)/drivesplat service-demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check scenes recon service tests

bench: setup
	$(BIN)/drivesplat bench synth

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
