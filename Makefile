# Two entry points for newcomers: `make demo` and `make test`. Both set everything up first
# (idempotent: a second run only checks) and then run.
PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo lint cluster-deps test test-fast test-slurm test-multinode clean

setup: $(STAMP)

# Re-run the install when the dependency list, the Horovod build script or a patch changes
# (the folder: a patch added or removed).
$(STAMP): setup.cfg setup.py scripts/build_horovod.sh scripts/horovod-patches $(wildcard scripts/horovod-patches/*.patch)
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(PY) -m pip install -q -e ".[test]"
	PYTHON=$(PY) bash scripts/build_horovod.sh
	@touch $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .

# System packages the SLURM and multinode tests need (root, apt-get; announced with their
# list; a second run only checks). Nothing else installs system packages.
cluster-deps:
	bash scripts/install_slurm.sh

# Everything: lint, unit tests, in-process runs, launchers (horovodrun, mpirun), SLURM.
test: lint cluster-deps
	$(PY) -m pytest

# The in-process tier for a developer's feedback loop (under a minute): no subprocesses.
test-fast: setup
	$(PY) -m pytest -m "not slow" -q

test-slurm: setup cluster-deps
	$(PY) -m pytest -m slurm

test-multinode: setup cluster-deps
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
