"""Flag groups (base, performance, distributed, schedule) in the tensorflow/models style.

Each `define_*` registers only its own group on `flag_values` (default: absl's global FLAGS),
so an entry point takes only what it needs and tests can parse into a fresh FlagValues.
Batch sizes are GLOBAL (summed over all ranks), as in the TPU resnet_main.
"""
import dataclasses
import os
from typing import Optional

from absl import flags

FLAGS = flags.FLAGS

PRECISIONS = ("float32", "bfloat16")
MODES = ("train", "eval", "train_and_eval")


# ---------------------------------------------------------------- config objects
@dataclasses.dataclass(frozen=True)
class BaseConfig:
    data_dir: Optional[str]
    model_dir: Optional[str]
    mode: str
    train_batch_size: int
    eval_batch_size: int
    train_steps: Optional[int]
    train_epochs: Optional[float]


@dataclasses.dataclass(frozen=True)
class PerformanceConfig:
    num_intra_threads: int
    num_inter_threads: int
    mkl: bool
    kmp_blocktime: int
    kmp_affinity: str
    kmp_settings: bool
    precision: str


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    fusion_threshold_mb: Optional[float]
    cycle_time_ms: Optional[float]
    fp16_allreduce: bool


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    base_learning_rate: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float


# ---------------------------------------------------------------- world size
_WORLD_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                    "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")


def launcher_world_size(environ=None) -> int:
    """Number of ranks announced by the launcher (horovodrun, mpirun, srun), 1 if none.

    Read from the environment so flag validation can run before Horovod starts.
    SLURM_NTASKS only counts when we are inside an srun step (SLURM_STEP_ID set).
    """
    env = os.environ if environ is None else environ
    for var in _WORLD_SIZE_VARS:
        if var == "SLURM_NTASKS" and "SLURM_STEP_ID" not in env:
            continue
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


# ---------------------------------------------------------------- definitions
def _positive(name, flag_values, allow_none=False):
    flags.register_validator(
        name, lambda v: (allow_none and v is None) or (v is not None and v > 0),
        message=f"--{name} must be a positive number", flag_values=flag_values)


def _non_negative(name, flag_values):
    flags.register_validator(name, lambda v: v is None or v >= 0,
                             message=f"--{name} must be >= 0", flag_values=flag_values)


def _divisible_by_world(name, flag_values):
    def check(value):
        # Only a value the user gave: a default batch that a mode does not use (e.g. the
        # training batch of an evaluation) must not stop the run; run() checks what it uses.
        if not flag_values[name].present:
            return True
        size = launcher_world_size()
        if value is not None and value > 0 and value % size:
            raise flags.ValidationError(
                f"--{name}={value} (global) is not divisible by the {size} ranks "
                f"of this launch")
        return True
    flags.register_validator(name, check, flag_values=flag_values)


def define_base(flag_values=FLAGS, data_dir=True, model_dir=True, mode=True,
                batch_size=True, train_steps=True, train_epochs=True,
                default_batch_size=1024):
    """Data/model dirs, mode, GLOBAL batch sizes and run length."""
    if data_dir:
        flags.DEFINE_string("data_dir", None, "Directory with the input data.",
                            flag_values=flag_values)
    if model_dir:
        flags.DEFINE_string("model_dir", None,
                            "Directory for checkpoints, summaries and reports; a run "
                            "resumes from the newest checkpoint found here.",
                            flag_values=flag_values)
    if mode:
        flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.",
                          flag_values=flag_values)
    if batch_size:
        flags.DEFINE_integer("train_batch_size", default_batch_size,
                             "GLOBAL training batch size, summed over all ranks; each "
                             "rank gets train_batch_size / ranks.", flag_values=flag_values)
        flags.DEFINE_integer("eval_batch_size", default_batch_size,
                             "GLOBAL evaluation batch size, summed over all ranks.",
                             flag_values=flag_values)
        for name in ("train_batch_size", "eval_batch_size"):
            _positive(name, flag_values)
            _divisible_by_world(name, flag_values)
    if train_steps:
        flags.DEFINE_integer("train_steps", None,
                             "Number of global training steps (one step = one global batch).",
                             flag_values=flag_values)
        _positive("train_steps", flag_values, allow_none=True)
    if train_epochs:
        flags.DEFINE_float("train_epochs", None,
                           "Training length in epochs; used when --train_steps is unset.",
                           flag_values=flag_values)
        _positive("train_epochs", flag_values, allow_none=True)


def define_performance(flag_values=FLAGS):
    """CPU threading, Intel OpenMP/MKL settings and numeric precision."""
    flags.DEFINE_integer("num_intra_threads", 0,
                         "Threads per op (TF intra-op pool) in each rank; 0 = TF picks.",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_inter_threads", 0,
                         "Ops run in parallel (TF inter-op pool) in each rank; 0 = TF picks.",
                         flag_values=flag_values)
    flags.DEFINE_boolean("mkl", False,
                         "Set KMP_BLOCKTIME, KMP_AFFINITY, KMP_SETTINGS and OMP_NUM_THREADS "
                         "(= num_intra_threads) before TensorFlow starts, as the 2018 "
                         "Intel-optimised runs did.", flag_values=flag_values)
    flags.DEFINE_integer("kmp_blocktime", 0,
                         "KMP_BLOCKTIME in ms when --mkl (time an OpenMP thread spins).",
                         flag_values=flag_values)
    flags.DEFINE_string("kmp_affinity", "granularity=fine,verbose,compact,1,0",
                        "KMP_AFFINITY when --mkl.", flag_values=flag_values)
    flags.DEFINE_boolean("kmp_settings", True, "KMP_SETTINGS=1 when --mkl (prints them).",
                         flag_values=flag_values)
    flags.DEFINE_enum("precision", "float32", PRECISIONS,
                      "Compute precision; bfloat16 uses Keras mixed_bfloat16 (fp32 weights).",
                      flag_values=flag_values)
    for name in ("num_intra_threads", "num_inter_threads", "kmp_blocktime"):
        _non_negative(name, flag_values)


def define_distributed(flag_values=FLAGS):
    """Horovod tensor fusion and gradient compression."""
    flags.DEFINE_float("fusion_threshold_mb", None,
                       "Horovod tensor-fusion buffer in MiB (sets HOROVOD_FUSION_THRESHOLD); "
                       "0 disables fusion; unset = the environment's value, else Horovod's "
                       "128 MiB, which is what the 2018 runs used.", flag_values=flag_values)
    flags.DEFINE_float("cycle_time_ms", None,
                       "Horovod cycle time in ms (HOROVOD_CYCLE_TIME); unset = the "
                       "environment's value, else 10 (Horovod's own 1 ms takes CPU from "
                       "compute on small nodes).",
                       flag_values=flag_values)
    flags.DEFINE_boolean("fp16_allreduce", False,
                         "Compress gradients to float16 for the allreduce.",
                         flag_values=flag_values)
    _non_negative("fusion_threshold_mb", flag_values)
    _positive("cycle_time_ms", flag_values, allow_none=True)


def define_schedule(flag_values=FLAGS, base_learning_rate=0.1, weight_decay=1e-4,
                    warmup_epochs=5.0):
    """Optimiser and learning-rate basics; the LR scales with the global batch."""
    flags.DEFINE_float("base_learning_rate", base_learning_rate,
                       "Learning rate per 256 images; the peak is "
                       "base_learning_rate * train_batch_size / 256.", flag_values=flag_values)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.", flag_values=flag_values)
    flags.DEFINE_float("weight_decay", weight_decay, "L2 weight decay on non-BN weights.",
                       flag_values=flag_values)
    flags.DEFINE_float("warmup_epochs", warmup_epochs,
                       "Epochs of linear learning-rate warm-up.", flag_values=flag_values)
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing for the cross-entropy.",
                       flag_values=flag_values)
    _positive("base_learning_rate", flag_values)
    for name in ("weight_decay", "warmup_epochs"):
        _non_negative(name, flag_values)
    flags.register_validator("momentum", lambda v: 0 <= v < 1,
                             message="--momentum must be in [0, 1)", flag_values=flag_values)
    flags.register_validator("label_smoothing", lambda v: 0 <= v < 1,
                             message="--label_smoothing must be in [0, 1)",
                             flag_values=flag_values)


# ---------------------------------------------------------------- getters
def _pick(cls, flag_values, **overrides):
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: (flag_values[n].value if n in flag_values else None) for n in names}
    values.update(overrides)
    return cls(**values)


def get_base_config(flag_values=FLAGS) -> BaseConfig:
    return _pick(BaseConfig, flag_values)


def get_performance_config(flag_values=FLAGS) -> PerformanceConfig:
    return _pick(PerformanceConfig, flag_values)


def get_distributed_config(flag_values=FLAGS) -> DistributedConfig:
    return _pick(DistributedConfig, flag_values)


def get_schedule_config(flag_values=FLAGS) -> ScheduleConfig:
    return _pick(ScheduleConfig, flag_values)
