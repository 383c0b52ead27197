"""The one Horovod module for Keras 3: init, gradient averaging, broadcast, exact metrics.

`horovod.tensorflow.keras` does not work with Keras 3 (its DistributedOptimizer can skip
the allreduce silently), so we use `horovod.tensorflow` inside our own `train_step`.
Everything works in a single process started without a launcher (size 1).
Code below this module takes a `Context` instead of calling Horovod for rank/size.
"""
import dataclasses
import os
import pathlib
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import keras
import numpy as np
import tensorflow as tf

from hooks.distributed import elastic_launch
from hooks.errors import ConfigError, UserError
from hooks.state.safe_files import follow_umask
from hooks.training.steps import check_number

T = TypeVar("T")


def _hvd():
    # Imported lazily: loading Horovod's native library is work we only do when asked.
    import horovod.tensorflow as hvd
    return hvd


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def check_global_batches(context: "Context", **batches: int) -> None:
    """Global batch sizes must split evenly over the ranks of this launch."""
    for name, value in batches.items():
        if value % context.size:
            raise ConfigError(f"--{name}={value} (global) is not divisible by the "
                              f"{context.size} ranks of this launch")


def rank_batch(global_batch: int, context: Context) -> int:
    """This rank's share of a global batch: global // size, one more on the first
    global % size ranks (an elastic world need not divide the batch; `DistributedTrainer.
    gradient_weight` then keeps the update that of the whole global batch)."""
    if global_batch < context.size:
        raise ConfigError(f"the global batch {global_batch} is smaller than the "
                          f"{context.size} ranks")
    return global_batch // context.size + (context.rank < global_batch % context.size)


# Horovod's 1 ms cycle wakes its background thread 1000 times a second to negotiate with
# the other ranks, which takes CPU from the compute threads on small CPU nodes; with one
# grouped allreduce per step, 10 ms costs at most a few cycles per step
# (docs/benchmarks.md, "Processes vs threads").
DEFAULT_CYCLE_TIME_MS = 10.0


def init(fusion_threshold_mb: float | None = None,
         cycle_time_ms: float | None = None) -> Context:
    """Initialise Horovod once; fusion settings must reach the environment before init.

    Gloo's own collective timeout (30 s by default) would kill a job whose rank 0 takes
    longer to write a checkpoint: it is set to a week unless the user set it, and stalls
    are bounded by `hooks.distributed.watchdog` (--stall_timeout_s) instead. The cycle time is
    `cycle_time_ms`, else HOROVOD_CYCLE_TIME, else DEFAULT_CYCLE_TIME_MS; in an elastic job
    on a Horovod without our re-init patch, Horovod's own 1 ms
    (`hooks.distributed.elastic_launch.check_launch` refuses a fixed one there)."""
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(7 * 24 * 3600))
    if fusion_threshold_mb is not None:
        mb = check_number("fusion_threshold_mb", fusion_threshold_mb, minimum=0)
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(mb * 1024 * 1024))
    if cycle_time_ms is not None:
        os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms)
    elif not elastic_launch.launched_elastic() or elastic_launch.reinit_keeps_cycle_time():
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(DEFAULT_CYCLE_TIME_MS))
    hvd = _hvd()
    if not hvd.is_initialized():
        hvd.init()
    context = _current_context()
    # Where the ranks landed (a collective): the one place a job log shows hosts. Not in an
    # elastic job (HOROVOD_ELASTIC, set by horovodrun): a joining worker's init would wait
    # for ranks that are mid-training; hooks.distributed.elastic prints it after each sync instead.
    if not elastic_launch.launched_elastic():
        line = describe_placement(placement(context))
        if context.is_chief:
            print(line, flush=True)
    return context


def placement(context: Context) -> list[tuple]:
    """(rank, host, local_rank, local_size) of every rank, in rank order (a collective)."""
    me = (context.rank, socket.gethostname(), context.local_rank, context.local_size)
    # Its own op name: Horovod's default is the type ("tuple"), shared with other
    # allgathers of tuples of another size, and an elastic joiner's fresh response cache
    # then disagreed with the others' (a Gloo size mismatch right after a join).
    return [me] if context.size == 1 else list(_hvd().allgather_object(me, name="placement"))


def describe_placement(ranks: Sequence[tuple], max_hosts: int = 8) -> str:
    """One line naming each host's ranks and local_size, plus a warning line when Horovod's
    local ranks disagree with the host names (per-node work would then be done twice or
    not at all, e.g. when every container of a job has the same hostname)."""
    hosts: dict[str, list] = {}
    for rank, host, local_rank, local_size in ranks:
        hosts.setdefault(host, []).append((local_rank, rank, local_size))
    parts, wrong = [], []
    for host, members in hosts.items():
        members.sort()
        if ([m[0] for m in members] != list(range(len(members)))
                or any(m[2] != len(members) for m in members)):
            wrong.append(host)
        parts.append(f"{host} rank {','.join(str(m[1]) for m in members)} "
                     f"local_size {members[0][2]}")
    more = f"; ... ({len(parts) - max_hosts} more)" if len(parts) > max_hosts else ""
    line = (f"horovod: {len(ranks)} rank(s) on {len(hosts)} host(s): "
            + "; ".join(parts[:max_hosts]) + more)
    if wrong:
        odd = [r for r in ranks if r[1] in wrong]
        line += (f"\nhorovod: warning: local ranks do not match host names on "
                 f"{', '.join(wrong[:max_hosts])}: (rank, host, local_rank, local_size) "
                 f"{odd[:max_hosts]}{' ...' if len(odd) > max_hosts else ''}")
    return line


def _current_context() -> Context:
    hvd = _hvd()
    return Context(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())


def reinit() -> Context:
    """Shut Horovod down and start it again (an elastic reset: in an elastic job `init`
    waits for the driver's new assignment); returns the new world's Context."""
    hvd = _hvd()
    hvd.shutdown()
    hvd.init()
    return _current_context()


# ---------------------------------------------------------------- collectives
def allreduce_gradients(grads: Sequence[tf.Tensor | None], context: Context,
                        fp16_compression: bool = False) -> list[tf.Tensor | None]:
    """Average gradients over ranks in one grouped (fused) allreduce; None stays None."""
    if context.size == 1:
        return list(grads)
    hvd = _hvd()
    compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
    present = [i for i, g in enumerate(grads) if g is not None]
    reduced = hvd.grouped_allreduce([grads[i] for i in present], op=hvd.Average,
                                    compression=compression)
    out = list(grads)
    for i, g in zip(present, reduced):
        out[i] = g
    return out


def allreduce_sum(values: Sequence[np.ndarray], context: Context) -> list[np.ndarray]:
    """Sum numpy arrays over ranks (eager)."""
    if context.size == 1:
        return [np.asarray(v) for v in values]
    hvd = _hvd()
    tensors = [tf.convert_to_tensor(v) for v in values]
    return [t.numpy() for t in hvd.grouped_allreduce(tensors, op=hvd.Sum)]


def allgather(array: np.ndarray, context: Context) -> np.ndarray:
    """Concatenate arrays from all ranks along axis 0, in rank order (sizes may differ)."""
    if context.size == 1:
        return np.asarray(array)
    return _hvd().allgather(tf.convert_to_tensor(array)).numpy()


def allgather_object(obj, context: Context) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if context.size == 1:
        return [obj]
    return list(_hvd().allgather_object(obj))


def broadcast_object(obj, context: Context, root_rank: int = 0):
    """Send a picklable Python object from root_rank to every rank."""
    if context.size == 1:
        return obj
    return _hvd().broadcast_object(obj, root_rank=root_rank)


def broadcast_variables(variables: Iterable, context: Context, root_rank: int = 0) -> None:
    """Overwrite every rank's variables with root_rank's values."""
    if context.size == 1:
        return
    # Keras 3 variables wrap a tf.Variable in `.value`; Horovod assigns those.
    tf_vars = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    _hvd().broadcast_variables(tf_vars, root_rank=root_rank)


def build_and_broadcast(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                        context: Context, root_rank: int = 0) -> None:
    """Create the optimizer slots, then make model + optimizer state identical everywhere.

    Called after any checkpoint restore on the root, so a resumed step reaches all ranks.
    """
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    broadcast_variables(list(model.variables) + list(optimizer.variables), context,
                        root_rank)


def all_ranks_ok(build: Callable[[], T], context: Context) -> T:
    """Run `build()` on every rank; if it raises a `UserError` on any rank, raise on every
    rank (the failing rank its own error, the others a pointer to it) instead of leaving
    the healthy ranks waiting in the next collective. Returns `build()`'s result."""
    error = None
    try:
        result = build()
    except UserError as err:
        error = err
    failed = int(allreduce_sum([np.int64(error is not None)], context)[0])
    if error is not None:
        raise error
    if failed:
        raise UserError(f"{failed} other rank(s) found bad input (their error names it)")
    return result


# ---------------------------------------------------------------- exact metrics
def _metric_variables(metrics: Sequence[keras.metrics.Metric]) -> list:
    return [v for m in metrics for v in m.variables]


def global_metric_results(metrics: Sequence[keras.metrics.Metric],
                          context: Context) -> dict[str, tf.Tensor]:
    """Results of `metrics` as if one process had seen every rank's data.

    The metrics' state variables (totals, counts, confusion counts) are summed over ranks,
    the result is read, and the local state is put back. Exact for metrics whose state is
    additive (Mean, accuracy, top-k, AUC thresholds): a sum of counts, not a mean of means.
    Works eagerly and inside tf.function (auto control dependencies keep the order).
    """
    if context.size == 1:
        return {m.name: m.result() for m in metrics}
    hvd = _hvd()
    variables = _metric_variables(metrics)
    local = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
    summed = hvd.grouped_allreduce(local, op=hvd.Sum)
    for v, s in zip(variables, summed):
        v.assign(s)
    results = {m.name: tf.identity(m.result()) for m in metrics}
    with tf.control_dependencies(list(results.values())):
        for v, x in zip(variables, local):
            v.assign(x)
    return results


def _to_python(value):
    array = np.asarray(keras.ops.convert_to_numpy(value))
    return array.item() if array.ndim == 0 else array.tolist()


class RequestFlag(keras.metrics.Metric):
    """A flag a rank raises between steps (`request()`); reported with each step's metrics
    as the number of ranks that raised it, so every rank learns of it at the same step."""

    def __init__(self, name="stop_request"):
        super().__init__(name=name)
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        return self.value

    def request(self) -> None:
        self.value.assign(1.0)


class DistributedTrainer(keras.Model):
    """Wraps a Keras model so that `fit` averages gradients across Horovod ranks.

    The wrapped `network` is what gets saved and exported. Metrics passed in are updated
    on each rank and reported exactly over all ranks (see `global_metric_results`).

    `gradient_weight`: each rank's loss (and so its gradient) is multiplied by it before
    the average. With per-rank batches n_r of a global batch B (`rank_batch`), n_r * size / B
    makes the averaged gradient exactly the mean over the B examples; 1.0 (equal batches)
    changes nothing. The loss, not the gradient, is weighted so that a gradient crossing
    ranks inside the backward pass (synchronized batch norm's allreduce) carries each
    rank's weight too. Read when the train step is traced: reset `train_function` after a
    change.
    """

    def __init__(self, network: keras.Model, context: Context,
                 metrics: Sequence[keras.metrics.Metric] = (),
                 fp16_allreduce: bool = False, exact_metrics: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.context = context
        self.fp16_allreduce = fp16_allreduce
        self.exact_metrics = exact_metrics
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.train_metrics = list(metrics)
        self.stop_request = RequestFlag()  # raised by hooks.state.faults.Preemption
        self.gradient_weight = 1.0

    @property
    def metrics(self):
        # Listed here so fit() resets them at each epoch (and sums them over ranks).
        return [self.loss_tracker] + self.train_metrics + [self.stop_request]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def get_metrics_result(self):
        # fit() reads the epoch's logs from here, not from the last step: make them global.
        results = (global_metric_results(self.metrics, self.context) if self.exact_metrics
                   else {m.name: m.result() for m in self.metrics})
        return {k: _to_python(v) for k, v in results.items()}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.network(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=True)
            weighted = loss * self.gradient_weight if self.gradient_weight != 1.0 else loss
            scaled_loss = self.optimizer.scale_loss(weighted)
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        grads = allreduce_gradients(grads, self.context, self.fp16_allreduce)
        self.optimizer.apply_gradients(zip(grads, variables))
        self.loss_tracker.update_state(loss, sample_weight=tf.shape(y_pred)[0])
        for metric in self.train_metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
        if self.exact_metrics:
            return global_metric_results(self.metrics, self.context)
        return {m.name: m.result() for m in self.metrics}


# ---------------------------------------------------------------- rank-0 output
def write_atomically(path: str, write: Callable[[str], None], context: Context) -> bool:
    """On the chief only: `write(tmp_path)`, then rename to `path` (readers never see half).

    Returns whether this rank wrote. `write` gets a path in the same folder so the final
    rename is atomic on POSIX file systems.
    """
    if not context.is_chief:
        return False
    folder = os.path.dirname(os.path.abspath(path))
    # Keep the whole suffix (".weights.h5", ".keras"): Keras picks the format by it.
    suffix = "".join(pathlib.Path(path).suffixes)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-",
                                   suffix=suffix)
        os.close(fd)
        write(tmp)
        follow_umask(tmp)  # mkstemp made it 0600
        with open(tmp, "rb+") as f:  # durable before it replaces the old file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def hostnames(context: Context) -> list[str]:
    """Every rank's host name, in rank order (a collective)."""
    return [host for _, host, _, _ in placement(context)]


def chief_logger(log: Callable, context_of: Callable[[], Context]) -> Callable:
    """`log` on rank 0 only, asked at each call (an elastic reset can make another rank
    rank 0)."""
    def chief_log(*args, **kwargs):
        if context_of().is_chief:
            log(*args, **kwargs)
    return chief_log


def chief_only(callbacks: Iterable[keras.callbacks.Callback],
               context: Context) -> list[keras.callbacks.Callback]:
    """The callbacks that write files (checkpoints, TensorBoard, CSV) run on rank 0 only."""
    return list(callbacks) if context.is_chief else []
