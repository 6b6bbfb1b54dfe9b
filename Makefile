# drivesplat — the two commands a newcomer runs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP   = $(VENV)/.installed

.PHONY: setup run demo test lint bench gpu-check gpu-check-tiny clean

# Idempotent: rebuilds only when pyproject.toml changed or the venv is missing.
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pin torch first: an unpinned torch requirement would pull the CUDA build and
	# several GB of CUDA packages; 2.13.0 resolves to the local CPU wheel here.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,waymo,worker,postgres]"
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

# The prepared device check (README, "The device check"). Runs with the machine's own
# python3 and torch (no venv: the GPU image brings its CUDA build); wheels and a gsplat
# source archive in .whl/ (carried with the tree) are installed first, gsplat compiled
# there for the local GPU. Results land in $(OUT) (the device tool sets OUT).
OUT ?= data/gpu-check
GPU_PYTHON ?= python3
# The device check must end inside a lent GPU's ~15 minutes, machine start included.
GPU_CHECK_BUDGET_S ?= 640
GSPLAT_SDIST := $(firstword $(wildcard .whl/gsplat-*.tar.gz))
gpu-check:
	mkdir -p "$(OUT)" .gpu-site
	# Wheels that travel with the tree (plyfile; a gsplat wheel an earlier check built).
	if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index \
	  --no-deps --no-compile --upgrade --target .gpu-site .whl/*.whl; fi
	# gsplat is compiled from its source archive in the background while the first
	# stages run on the torch backend (recon/gpu_check.py).
	PYTHONPATH=.:.gpu-site PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m recon.gpu_check --out "$(OUT)" \
	  --time-budget-s $(GPU_CHECK_BUDGET_S) --site .gpu-site \
	  $(if $(GSPLAT_SDIST),--gsplat-sdist $(GSPLAT_SDIST))

# The same stages at toy sizes on the CPU (what CI runs through the test suite).
gpu-check-tiny: setup
	$(BIN)/python -m recon.gpu_check --out "$(OUT)" --tiny

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
