"""Training checkpoints: written atomically and durably by rank 0, resumed from the newest
one that loads.

Layout: MODEL_DIR/ckpt-000001000/{model.weights.h5, optimizer.npz, state.json}. The folder
is written under a temporary name, every file and the folder are fsynced, then it is renamed
(and the parent fsynced), so neither a killed job nor a node crash leaves a half checkpoint
that looks complete. state.json records the step, epoch, learning rate, model description
and the last validation metrics, so a fine-tuning run can pick one by metric.

Faults: weights that are not finite are never saved nor restored (`NonFiniteError`); a
checkpoint that fails to load for any reason (truncated, missing part, bad JSON, non-finite)
is named in a warning, moved aside to `damaged-ckpt-...` (not deleted) and the previous one
is used (`restore_latest`); stale temporary folders of killed writes are removed
(`remove_stale_temps`); a full or unwritable disk is a one-line `CheckpointError` and the
previous checkpoints stay intact.
"""
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

from hooks.errors import UserError
from hooks.state import bn_weights
from hooks.state.safe_files import follow_umask, is_real_dir, write_text

_NAME = re.compile(r"^ckpt-(\d{9})$")
WEIGHTS, OPTIMIZER, STATE = "model.weights.h5", "optimizer.npz", "state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used or written; the message names it."""


class NonFiniteError(UserError):
    """Weights or loss that are NaN or infinite: the run diverged."""


class Checkpoint(NamedTuple):
    step: int
    path: str
    state: dict


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """fsync every file in `folder`, then the folder itself (its entries)."""
    for name in os.listdir(folder):
        _fsync(os.path.join(folder, name))
    _fsync(folder)


def non_finite(arrays) -> int:
    """Number of arrays in `arrays` (numpy-convertible) holding a NaN or an infinity."""
    return sum(not np.all(np.isfinite(np.asarray(a, np.float64))) for a in arrays
               if np.asarray(a).dtype.kind == "f")


def describe(network: keras.Model) -> dict:
    """The fingerprint recorded in state.json["network"]: a checkpoint whose fingerprint
    matches but does not load is damaged; one that does not match is another model's."""
    return {"name": network.name, "params": int(network.count_params()),
            "tensors": len(network.weights)}


def _variables(network, optimizer) -> list:
    return list(network.weights) + (list(optimizer.variables) if optimizer is not None else [])


def save(model_dir: str, step: int, network: keras.Model,
         optimizer: keras.optimizers.Optimizer | None, state: dict,
         keep: int = 5) -> str:
    """Write checkpoint `step` (call on rank 0 only) and prune old ones, keeping the
    `keep` newest plus the one with the best recorded `best_metric`. Refuses non-finite
    weights (`NonFiniteError`); a disk error is a `CheckpointError` naming the folder."""
    bad = non_finite(v.numpy() for v in _variables(network, optimizer))
    if bad:
        raise NonFiniteError(f"{bad} weight tensors are not finite at step {step}: not "
                             f"writing checkpoint {step} to {model_dir}")
    final = os.path.join(model_dir, f"ckpt-{step:09d}")
    tmp = None
    try:
        os.makedirs(model_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=model_dir, prefix=f".ckpt-{step:09d}-")
        network.save_weights(os.path.join(tmp, WEIGHTS))
        if optimizer is not None:
            np.savez(os.path.join(tmp, OPTIMIZER),
                     *[np.asarray(v.numpy()) for v in optimizer.variables])
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(dict(state, step=step), f, indent=1, sort_keys=True, default=float)
        follow_umask(tmp)  # mkdtemp made it 0700: readable as the umask says, like its files
        _fsync_folder(tmp)
        replaced = None
        if os.path.lexists(final):  # same step written again: swap, never lose both
            replaced = tempfile.mkdtemp(dir=model_dir, prefix=f".ckpt-{step:09d}-replaced-")
            os.rename(final, os.path.join(replaced, "old"))
        os.rename(tmp, final)
        _fsync(model_dir)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
    except OSError as err:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise CheckpointError(f"cannot write checkpoint {final}: {reason} (the previous "
                              "checkpoints are intact)") from None
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(model_dir, keep)
    return final


def remove_stale_temps(model_dir: str | None) -> list[str]:
    """Remove the temporary folders and files that killed writes left in model_dir (call
    on rank 0 before training); returns what was removed. A symlink named like one is
    left alone: we never create links, so it is not ours, and following it could delete
    a folder outside model_dir."""
    if not model_dir or not os.path.isdir(model_dir):
        return []
    removed = []
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name.startswith((".ckpt-", ".tmp-")) and not os.path.islink(path):
            if is_real_dir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def check_model_dir(model_dir: str | None, writable: bool, flag: str = "--model_dir") -> None:
    """ConfigError unless `model_dir` is a folder we can write, or one we could create
    (it is not created here: a run refused by a later check leaves nothing behind)."""
    from hooks.errors import ConfigError

    if not model_dir:
        return
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError(f"{flag}={model_dir} is a file, not a directory")
    if not writable:
        return
    existing = os.path.abspath(model_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag}={model_dir}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{flag}={model_dir} is not writable: "
                          f"{err.strerror or err}") from None


def _read_state(path: str) -> dict | None:
    try:
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if os.path.exists(os.path.join(path, WEIGHTS)) else None


def read(path: str) -> Checkpoint | None:
    """The checkpoint in folder `path` (any name), or None if it is not a complete one."""
    state = _read_state(path) if os.path.isdir(path) else None
    if state is None:
        return None
    return Checkpoint(int(state.get("step", 0)), path, state)


def list_checkpoints(model_dir: str | None) -> list[Checkpoint]:
    """Complete checkpoints in model_dir, oldest first (half-written ones are ignored, and
    so are symlinks named like a checkpoint: pruning or moving them aside would follow
    them out of model_dir)."""
    if not model_dir or not os.path.isdir(model_dir):
        return []
    found = []
    for name in os.listdir(model_dir):
        match = _NAME.match(name)
        path = os.path.join(model_dir, name)
        state = _read_state(path) if match and is_real_dir(path) else None
        if state is not None:
            found.append(Checkpoint(int(match.group(1)), path, state))
    return sorted(found)


def latest(model_dir: str | None) -> Checkpoint | None:
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def best(model_dir: str, metric: str, mode: str = "max") -> Checkpoint | None:
    """The checkpoint whose recorded validation `metric` is best (ties: the newer)."""
    scored = [c for c in list_checkpoints(model_dir)
              if isinstance(c.state.get("metrics", {}).get(metric), (int, float))]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda c: (sign * c.state["metrics"][metric], c.step))


def _prune(model_dir: str, keep: int) -> None:
    found = list_checkpoints(model_dir)
    protected = {c.path for c in found[-keep:]}
    metric = found[-1].state.get("best_metric") if found else None
    if metric:
        top = best(model_dir, metric, found[-1].state.get("best_mode", "max"))
        if top:
            protected.add(top.path)
    for c in found:
        if c.path not in protected:
            shutil.rmtree(c.path, ignore_errors=True)


def restore(checkpoint: Checkpoint, network: keras.Model,
            optimizer: keras.optimizers.Optimizer | None = None,
            log: Callable[[str], None] = print) -> None:
    """Load weights (and optimizer slots + step when given) from `checkpoint`. Weights
    written with another batch-norm layer class (Keras's, our fused or synchronized ones)
    are converted (`bn_weights`; `log` gets one line saying so).

    CheckpointError when it was written by another model (a user mistake); any other
    failure (damaged files, a missing part, non-finite values) is also a CheckpointError,
    raised from the underlying error: `restore_latest` tells them apart."""
    recorded = checkpoint.state.get("network")
    if recorded and recorded != describe(network):
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit model "
                              f"{network.name}: it holds {recorded}, this model is "
                              f"{describe(network)}")
    try:
        bn_weights.load_weights(network, os.path.join(checkpoint.path, WEIGHTS), log)
    except bn_weights.WeightsMismatch as err:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit model "
                              f"{network.name}: {err}") from None
    except (ValueError, KeyError) as err:
        if recorded is None:  # no fingerprint: assume another model, never move it aside
            raise CheckpointError(
                f"checkpoint {checkpoint.path} does not fit model {network.name}: "
                f"{str(err).splitlines()[0]}") from err
        raise _Damaged(f"{WEIGHTS}: {str(err).splitlines()[0]}") from err
    except OSError as err:
        raise _Damaged(f"{WEIGHTS}: {str(err).splitlines()[0]}") from err
    if optimizer is not None:
        _restore_optimizer(checkpoint, network, optimizer)
    bad = non_finite(v.numpy() for v in _variables(network, optimizer))
    if bad:
        raise _Damaged(f"{bad} weight tensors are not finite")


def _restore_optimizer(checkpoint, network, optimizer) -> None:
    opt_file = os.path.join(checkpoint.path, OPTIMIZER)
    if not os.path.exists(opt_file):
        raise _Damaged(f"{OPTIMIZER} is missing (resuming would restart the schedule at 0)")
    if not optimizer.built:
        optimizer.build(network.trainable_variables)
    try:
        with np.load(opt_file) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
    except Exception as err:  # zipfile, EOFError, ValueError, OSError: a damaged file
        raise _Damaged(f"{OPTIMIZER}: {err}") from err
    if len(values) != len(optimizer.variables) or any(
            v.shape != tuple(var.shape) for v, var in zip(values, optimizer.variables)):
        raise CheckpointError(f"optimizer state in {opt_file} does not match this optimizer")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    if int(optimizer.iterations.numpy()) != checkpoint.step:
        raise _Damaged(f"{OPTIMIZER} holds step {int(optimizer.iterations.numpy())}, "
                       f"the folder says {checkpoint.step}")


class _Damaged(CheckpointError):
    """A checkpoint whose files are damaged (not one written by another model)."""


def _all_folders(model_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ckpt-* folder, complete or not, oldest first (not links)."""
    found = []
    for name in os.listdir(model_dir):
        match = _NAME.match(name)
        if match and is_real_dir(os.path.join(model_dir, name)):
            found.append((int(match.group(1)), os.path.join(model_dir, name)))
    return sorted(found)


def move_aside(path: str, reason: str) -> str:
    """Rename a damaged checkpoint folder to damaged-<name>-<time> (kept for inspection) and
    write the reason into DAMAGED.txt there. Whatever is already named DAMAGED.txt in the
    folder (a planted link) is unlinked, never followed; the note is created exclusively.
    The note is best effort: the caller's warning carries the reason too."""
    folder, name = os.path.split(path)
    target = os.path.join(folder, f"damaged-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, target)
    note = os.path.join(target, "DAMAGED.txt")
    try:
        if os.path.lexists(note) and not is_real_dir(note):
            os.unlink(note)  # removes a link itself, not what it points at
        write_text(note, reason + "\n", exclusive=True)
    except OSError:
        pass
    return target


def restore_latest(model_dir: str | None, network: keras.Model,
                   optimizer: keras.optimizers.Optimizer | None,
                   warn: Callable[[str], None] = print,
                   move_damaged: bool = True) -> Checkpoint | None:
    """Restore the newest checkpoint in model_dir that loads (call on rank 0 only, or with
    `move_damaged=False` on others: they skip damaged ones and leave them in place).

    Each one that does not (any damage: truncated, missing part, bad JSON, non-finite) is
    named in a one-line warning and moved aside; None when model_dir holds no checkpoint
    at all; CheckpointError when checkpoints exist but none loads (never a silent restart
    from step 0)."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    folders = _all_folders(model_dir)
    moved = []
    for step, path in reversed(folders):
        found = read(path)
        try:
            if found is None:
                raise _Damaged(f"{STATE} or {WEIGHTS} is missing or unreadable")
            restore(found._replace(step=step), network, optimizer, log=warn)
            return found._replace(step=step)
        except _Damaged as err:
            reason = str(err)
            target = move_aside(path, reason) if move_damaged else path
            moved.append(target)
            warn(f"warning: checkpoint {path} cannot be used ({reason}); "
                 + (f"moved to {target}, " if move_damaged else "")
                 + "trying the previous one")
    if moved:
        raise CheckpointError(f"no usable checkpoint in {model_dir}: all {len(moved)} were "
                              f"damaged{' and moved aside' if move_damaged else ''} (first: "
                              f"{moved[0]}); refusing to restart from step 0 over them")
    return None
