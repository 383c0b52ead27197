# Two entry points for newcomers: `make demo` and `make test`. Both set everything up first
# (idempotent: a second run only checks) and then run.
PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo lint cluster-deps test test-fast test-slurm test-multinode clean

# The Python packages, re-installed when the dependency list changes (a stamp). Then the
# Horovod check, every time (a few seconds): scripts/build_horovod.sh installs or rebuilds
# when TensorFlow, the patches or the MPI (MPI_HOME, `module load`) changed. No root needed.
setup: $(STAMP)
	@PYTHON=$(PY) bash scripts/build_horovod.sh

$(STAMP): setup.cfg setup.py
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .

# System packages the SLURM and multinode tests need (root, apt-get; announced with their
# list; a second run only checks), among them Debian's OpenMPI. Nothing else installs system
# packages.
cluster-deps:
	bash scripts/install_slurm.sh

# Everything: lint, unit tests, in-process runs, launchers (horovodrun, mpirun), SLURM.
# cluster-deps first, so that the set-up that follows finds Debian's OpenMPI and builds
# Horovod with MPI (the mpirun and SLURM tests need it).
test: cluster-deps
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

# The in-process tier for a developer's feedback loop (under a minute): no subprocesses.
test-fast: setup
	$(PY) -m pytest -m "not slow" -q

test-slurm: cluster-deps
	$(MAKE) --no-print-directory setup
	$(PY) -m pytest -m slurm

test-multinode: cluster-deps
	$(MAKE) --no-print-directory setup
	$(PY) -m pytest -m multinode

clean:
	rm -rf demo_out .pytest_cache

# The OCI image for CPU clusters (podman; root makes the base with debootstrap when no
# registry is reachable): container/Containerfile, docs/container.md. BASE=IMAGE picks the base.
.PHONY: image image-check
image:
	bash scripts/build_image.sh

# A 2-rank resnet_main.py run inside the built image (root: podman image mount + chroot).
image-check:
	bash scripts/run_in_image.sh
