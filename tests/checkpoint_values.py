"""What a checkpoint holds, read from its files (h5py, numpy): the values resume tests
compare with a reference run the test made itself."""
from pathlib import Path

import h5py
import numpy as np

from hooks.state import checkpoints

# A resumed run and its uninterrupted reference, each a fresh process with the same seed,
# threads, world and batches: measured bit-identical on this machine (kill -9, SIGTERM,
# SLURM requeue).
RESUME_ATOL = 0.0


def weights(path) -> dict[str, np.ndarray]:
    """Every array of a Keras .weights.h5 file, by its path in the file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj))
                     if isinstance(obj, h5py.Dataset) else None)
    assert arrays, f"no weights in {path}"
    return arrays


def state(folder) -> dict[str, np.ndarray]:
    """Weights and optimizer variables (step, momentum, ...) of one checkpoint folder."""
    folder = Path(folder)
    arrays = weights(folder / checkpoints.WEIGHTS)
    with np.load(folder / checkpoints.OPTIMIZER) as data:
        arrays.update({f"optimizer/{name}": data[name] for name in data.files})
    return arrays


def newest_state(model_dir) -> dict[str, np.ndarray]:
    found = checkpoints.latest(str(model_dir))
    assert found is not None, f"no checkpoint in {model_dir}"
    return state(found.path)


def assert_same_state(got: dict, want: dict, atol: float = 0.0) -> None:
    """Same variables with equal values (atol 0: bit for bit)."""
    assert sorted(got) == sorted(want)
    for name in want:
        if atol:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
        else:
            assert np.array_equal(got[name], want[name]), (
                f"{name} differs: max |diff| {np.abs(got[name] - want[name]).max()}")


def assert_trained(final: dict, first: dict, min_change: float = 1e-4) -> None:
    """The weights moved between two checkpoints (so equal final states are not trivial)."""
    moved = max(np.abs(final[k] - first[k]).max() for k in first if not k.startswith("opt"))
    assert moved > min_change, f"the weights barely changed ({moved})"
