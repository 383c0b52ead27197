#!/usr/bin/env bash
# Print the versions an environment holds, one `name: value` a line: Python, TensorFlow,
# Keras, Horovod (its patch level and built controllers), Open MPI and its PMIx components.
# The image build writes this to /opt/hpc-resnet/IMAGE_INFO.txt; on a host it runs as is.
set -euo pipefail
PYTHON=${PYTHON:-python}
# TensorFlow's start-up lines go to stderr; the values go to stdout.
"$PYTHON" - 2>/dev/null <<'PY'
import platform
import keras
import tensorflow as tf
import horovod
import horovod.tensorflow as hvd
try:
    from horovod import _hpc_resnet_patches as patches
    level = patches.PATCH_LEVEL
except ImportError:
    level = "none (not built by scripts/build_horovod.sh)"
print(f"python: {platform.python_version()}")
print(f"tensorflow: {tf.__version__}")
print(f"keras: {keras.__version__}")
print(f"horovod: {horovod.__version__} (patch level {level})")
controllers = [n for n, ok in (("mpi", hvd.mpi_built()), ("gloo", hvd.gloo_built())) if ok]
print(f"horovod controllers: {', '.join(controllers)}")
PY
if command -v ompi_info >/dev/null 2>&1; then
  echo "openmpi: $(ompi_info --version 2>/dev/null | sed -n 's/^Open MPI v//p')"
  # The PMIx components decide whether SLURM's `srun --mpi=pmix` can start the ranks.
  echo "openmpi pmix components: $(ompi_info 2>/dev/null | sed -n 's/.*MCA pmix: \([a-z0-9]*\).*/\1/p' | paste -sd' ')"
  if pmix=$(dpkg-query -W -f '${Version}' libpmix2 2>/dev/null); then
    echo "pmix: $pmix (Debian libpmix2)"
  fi
else
  echo "openmpi: not installed"
fi
