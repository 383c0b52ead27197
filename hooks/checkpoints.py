"""Training checkpoints: written atomically by rank 0, resumed from the newest loadable one.

Layout: MODEL_DIR/ckpt-000001000/{model.weights.h5, optimizer.npz, state.json}. The folder
is written under a temporary name and renamed, so a killed job never leaves a half
checkpoint that looks complete. state.json records the step, epoch, learning rate, model
description and the last validation metrics, so a fine-tuning run can pick one by metric.
"""
import json
import os
import re
import shutil
import tempfile
from typing import NamedTuple

import keras
import numpy as np

from hooks.errors import UserError

_NAME = re.compile(r"^ckpt-(\d{9})$")
WEIGHTS, OPTIMIZER, STATE = "model.weights.h5", "optimizer.npz", "state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it."""


class Checkpoint(NamedTuple):
    step: int
    path: str
    state: dict


def save(model_dir: str, step: int, network: keras.Model,
         optimizer: keras.optimizers.Optimizer | None, state: dict,
         keep: int = 5) -> str:
    """Write checkpoint `step` (call on rank 0 only) and prune old ones, keeping the
    `keep` newest plus the one with the best recorded `best_metric`."""
    os.makedirs(model_dir, exist_ok=True)
    final = os.path.join(model_dir, f"ckpt-{step:09d}")
    tmp = tempfile.mkdtemp(dir=model_dir, prefix=f".ckpt-{step:09d}-")
    try:
        network.save_weights(os.path.join(tmp, WEIGHTS))
        if optimizer is not None:
            np.savez(os.path.join(tmp, OPTIMIZER),
                     *[np.asarray(v.numpy()) for v in optimizer.variables])
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(dict(state, step=step), f, indent=1, sort_keys=True, default=float)
        if os.path.exists(final):  # same step written again (e.g. after a requeue)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(model_dir, keep)
    return final


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
    """Complete checkpoints in model_dir, oldest first (half-written ones are ignored)."""
    if not model_dir or not os.path.isdir(model_dir):
        return []
    found = []
    for name in os.listdir(model_dir):
        match = _NAME.match(name)
        path = os.path.join(model_dir, name)
        state = _read_state(path) if match else None
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
            optimizer: keras.optimizers.Optimizer | None = None) -> None:
    """Load weights (and optimizer slots + step when given) from `checkpoint`."""
    try:
        network.load_weights(os.path.join(checkpoint.path, WEIGHTS))
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit model {network.name}: "
            f"{str(err).splitlines()[0]}") from err
    opt_file = os.path.join(checkpoint.path, OPTIMIZER)
    if optimizer is None or not os.path.exists(opt_file):
        return
    if not optimizer.built:
        optimizer.build(network.trainable_variables)
    with np.load(opt_file) as data:
        values = [data[f"arr_{i}"] for i in range(len(data.files))]
    if len(values) != len(optimizer.variables) or any(
            v.shape != tuple(var.shape) for v, var in zip(values, optimizer.variables)):
        raise CheckpointError(f"optimizer state in {opt_file} does not match this optimizer")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
