"""Load a Keras `.weights.h5` file across the two batch-norm layer classes.

Keras 3 keys the entries of a `.weights.h5` file by layer *class*, numbered in layer order
(``layers/batch_normalization_7/vars/0``), not by layer name. Checkpoints written while
DenseNet used Keras's ``BatchNormalization`` therefore hold ``batch_normalization_N``
entries, which a model built with ``FusedBatchNormalization`` (the default since fused batch
norm is) looks for as ``fused_batch_normalization_N``: Keras refuses them ("expected 4
variables, but received 0"). Both layers have the same variables in the same order, so the
N-th batch norm of the file is the N-th batch norm of the model. The synchronized layers
(`SyncBatchNormalization`, `SyncFusedBatchNormalization`: --sync_bn) have the same variables
too. `load_weights` detects a file written with another of these classes and maps every
entry onto the model's layers by that position, checking each variable's shape; anything
that does not line up is a one-line `WeightsMismatch` naming the file, before any variable
changes.
"""

from __future__ import annotations

from collections.abc import Callable

from hooks.errors import UserError

# The classes whose entries are interchangeable (same variables, same order).
_BN_CLASSES = ("BatchNormalization", "FusedBatchNormalization", "SyncBatchNormalization",
               "SyncFusedBatchNormalization")


class WeightsMismatch(UserError):
    """A weights file whose entries do not line up with the model's layers."""


def _snake(class_name: str) -> str:
    from keras.src.utils import naming  # the function Keras names the entries with

    return naming.to_snake_case(class_name)


def _entries(layers, bn_as: str | None = None, prefix: str = "layers") -> list:
    """[(h5 path of the layer's entry, layer)] as Keras's saving walks `layers` (numbering
    per class in order; nested models recursed), every batch norm named as class `bn_as`
    when given (the names a file written with that class uses)."""
    used: dict[str, int] = {}
    found = []
    for layer in layers:
        name = type(layer).__name__
        key = _snake(bn_as if bn_as and name in _BN_CLASSES else name)
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        found.append((f"{prefix}/{key}", layer))
        if hasattr(layer, "layers"):  # a nested model: its layers are saved inside it
            found += _entries(layer.layers, bn_as, f"{prefix}/{key}/layers")
    return found


def _stored_vars(h5file) -> set:
    """Paths of every entry in the file that holds variables."""
    paths = set()

    def visit(name, obj):
        if name.endswith("/vars") and len(obj):
            paths.add(name[: -len("/vars")])

    h5file.visititems(visit)
    return paths


def _own_shapes(layer) -> list:
    store: dict = {}
    layer.save_own_variables(store)  # Keras's own order: trainable, then non-trainable
    return [tuple(store[str(i)].shape) for i in range(len(store))]


def _convert(network, path: str, h5file, entries) -> int:
    """Arrays of every entry, checked against the layers, then assigned; returns the
    number of batch-norm entries converted."""
    stored = _stored_vars(h5file)
    wanted = {p for p, layer in entries if _own_shapes(layer)}
    if stored != wanted:
        extra = sorted(stored - wanted)[:1] or sorted(wanted - stored)[:1]
        raise WeightsMismatch(
            f"{path}: its {len(stored)} entries with variables do not line up with the "
            f"{len(wanted)} layers with variables of {network.name} (first odd one: "
            f"{extra[0]})")
    staged = []
    for entry, layer in entries:
        shapes = _own_shapes(layer)
        if not shapes:
            continue
        group = h5file[entry + "/vars"]
        arrays = [group[str(i)][()] if str(i) in group else None for i in range(len(group))]
        got = [None if a is None else tuple(a.shape) for a in arrays]
        if got != shapes:
            raise WeightsMismatch(f"{path}: entry {entry} holds shapes {got}, layer "
                                  f"{layer.name} of {network.name} needs {shapes}")
        staged.append((layer, {str(i): a for i, a in enumerate(arrays)}))
    for layer, store in staged:
        layer.load_own_variables(store)
    return sum(type(layer).__name__ in _BN_CLASSES for layer, _ in staged)


def load_weights(network, path: str, log: Callable[[str], None] = print) -> bool:
    """`network.load_weights(path)`, also for a `.weights.h5` file written with another
    batch-norm class (mapped by position and shape; one log line says so). Returns whether
    it converted. Other files and other mismatches go to Keras unchanged."""
    own = _entries(network.layers)
    bn_paths = [p for p, layer in own if type(layer).__name__ in _BN_CLASSES]
    if not bn_paths or not str(path).endswith(".weights.h5"):
        network.load_weights(path)
        return False
    import h5py

    try:
        h5file = h5py.File(path, "r")
    except OSError:
        network.load_weights(path)  # Keras's error for a missing or damaged file
        return False
    with h5file:
        converted = written_by = None
        # Written with another class: none of our entries, some of theirs.
        if not any(p in h5file for p in bn_paths):
            for written_by in _BN_CLASSES:
                other = _entries(network.layers, bn_as=written_by)
                if any(p in h5file for p, layer in other
                       if type(layer).__name__ in _BN_CLASSES):
                    converted = _convert(network, path, h5file, other)
                    break
    if converted is None:  # our own class's entries, or another model: Keras's loader
        network.load_weights(path)
        return False
    new = type(next(layer for _, layer in own if type(layer).__name__ in _BN_CLASSES)).__name__
    log(f"{path}: converted {converted} batch-norm entries written by {written_by} layers "
        f"to this model's {new} layers (matched by position and shape)")
    return True
