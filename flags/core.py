"""Flag groups (base, performance, distributed, faults, elastic, schedule), tensorflow/models style.

Each `define_*` registers only its own group on `flag_values` (default: absl's global FLAGS),
so an entry point takes only what it needs and tests can parse into a fresh FlagValues.
Flags are defined from config dataclasses (`define_fields`): a flag's type and default are
its field's, and `fill` builds the config back by field name.
Batch sizes are GLOBAL (summed over all ranks), as in the TPU resnet_main.
"""
import dataclasses
import math
import os
import typing

from absl import flags

from hooks import settings
from hooks.distributed import elastic_launch

FLAGS = flags.FLAGS

PRECISIONS = settings.PRECISIONS
MODES = ("train", "eval", "train_and_eval")


# ---------------------------------------------------------------- config objects
# Only the groups that are not part of an entry point's own config; their dataclass
# defaults are the flags' defaults (one source).
@dataclasses.dataclass(frozen=True)
class PerformanceConfig:
    num_intra_threads: int = 0
    num_inter_threads: int = 0
    mkl: bool = False
    kmp_blocktime: int = 0
    kmp_affinity: str = "granularity=fine,verbose,compact,1,0"
    kmp_settings: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    fusion_threshold_mb: float | None = None
    cycle_time_ms: float | None = None


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


_WORLD_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                    "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launcher_rank(environ=None) -> int:
    """This process's rank as announced by the launcher, 0 if none (before Horovod starts:
    for messages that one rank should print). SLURM_PROCID counts only inside a step."""
    env = os.environ if environ is None else environ
    for var in _WORLD_RANK_VARS:
        if var == "SLURM_PROCID" and "SLURM_STEP_ID" not in env:
            continue
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


# ---------------------------------------------------------------- definitions
# Finite too: absl parses "inf" as a float, which later fails as a traceback (int(inf)).
def _positive(name, flag_values, allow_none=False):
    flags.register_validator(
        name, lambda v: (allow_none and v is None) or (v is not None and 0 < v < math.inf),
        message=f"--{name} must be a positive finite number", flag_values=flag_values)


def _non_negative(name, flag_values):
    flags.register_validator(name, lambda v: v is None or 0 <= v < math.inf,
                             message=f"--{name} must be a finite number >= 0",
                             flag_values=flag_values)


def _divisible_by_world(name, flag_values):
    def check(value):
        # Only a value the user gave: a default batch that a mode does not use (e.g. the
        # training batch of an evaluation) must not stop the run; run() checks what it uses.
        if not flag_values[name].present:
            return True
        if elastic_launch.launched_elastic():
            return True  # elastic: the world changes; any size works (hooks.distributed.elastic)
        size = launcher_world_size()
        if value is not None and value > 0 and value % size:
            raise flags.ValidationError(
                f"--{name}={value} (global) is not divisible by the {size} ranks "
                f"of this launch")
        return True
    flags.register_validator(name, check, flag_values=flag_values)


def _field_type(hint):
    """int/float/str/bool/tuple from a field annotation, unwrapping Optional[...]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else (typing.get_origin(hint) or hint)


_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, tuple: flags.DEFINE_list}


def define_fields(config_cls, helps, flag_values=FLAGS, enums=None):
    """One flag per `helps` entry (name -> help text): its type and default are those of
    the field of the same name in dataclass `config_cls`, so a default is written once.
    `enums` maps a name to its allowed values (a DEFINE_enum)."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name, help_ in helps.items():
        default = fields[name].default
        if enums and name in enums:
            flags.DEFINE_enum(name, default, enums[name], help_, flag_values=flag_values)
            continue
        kind = _field_type(hints[name])
        if kind is tuple:
            default = [str(v) for v in default]
        _DEFINE[kind](name, default, help_, flag_values=flag_values)


BASE_HELP = {
    "data_dir": "Directory with the input data.",
    "model_dir": "Directory for checkpoints, summaries and reports; a run resumes from the "
                 "newest checkpoint found here.",
    "mode": "What to run.",
    "train_batch_size": "GLOBAL training batch size, summed over all ranks; each rank gets "
                        "train_batch_size / ranks.",
    "eval_batch_size": "GLOBAL evaluation batch size, summed over all ranks.",
    "train_steps": "Global training steps (one step = one global batch). Give this or "
                   "--train_epochs, not both.",
    "train_epochs": "Training length in epochs. Give this or --train_steps, not both.",
}
PERFORMANCE_HELP = {
    "num_intra_threads": "Threads per op (TF intra-op pool, which also runs oneDNN) in each "
                         "rank; 0 = OMP_NUM_THREADS if set (the 2018 meaning), else TF picks.",
    "num_inter_threads": "Ops run in parallel (TF inter-op pool) in each rank; 0 = TF picks.",
    "mkl": "Accepted for the 2018 command line; changes nothing (says so at start): TF 2.21 "
           "uses oneDNN by default (TF_ENABLE_ONEDNN_OPTS=0 turns it off).",
    "kmp_blocktime": "Accepted for the 2018 command line; changes nothing: TF 2.21 links no "
                     "OpenMP runtime (oneDNN runs on TF's intra-op pool).",
    "kmp_affinity": "Accepted for the 2018 command line; changes nothing (no OpenMP runtime): "
                    "bind ranks to cores with the launcher (srun --cpu-bind, mpirun "
                    "--bind-to).",
    "kmp_settings": "Accepted for the 2018 command line; changes nothing (no OpenMP runtime).",
}
PRECISION_HELP = {
    "precision": "Compute precision; bfloat16 uses Keras mixed_bfloat16 (fp32 weights).",
    "fp16_allreduce": "Compress gradients to float16 for the allreduce.",
    "fused_bn": "Batch norm by TensorFlow's fused kernel (FusedBatchNormalization; bf16 "
                "activations stay bf16); --fused_bn=false uses Keras's BatchNormalization "
                "(for comparison). Checkpoints written with either load into both.",
    "sync_bn": "Synchronized batch norm: training-mode batch statistics over all ranks "
               "(one allreduce per BN layer; for small per-rank batches).",
}
DISTRIBUTED_HELP = {
    "fusion_threshold_mb": "Horovod tensor-fusion buffer in MiB (sets "
                           "HOROVOD_FUSION_THRESHOLD); 0 disables fusion; unset = the "
                           "environment's value, else Horovod's 128 MiB, which is what the "
                           "2018 runs used.",
    "cycle_time_ms": "Horovod cycle time in ms (HOROVOD_CYCLE_TIME); unset = the "
                     "environment's value, else 10 (Horovod's own 1 ms takes CPU from "
                     "compute on small nodes).",
}
FAULTS_HELP = {
    "on_nonfinite": "On a NaN/inf global loss or weights: stop (exit naming the step, no "
                    "checkpoint of them) or rollback (back to the last good state, skipping "
                    "the batches since, at most --max_rollbacks times).",
    "max_rollbacks": "Rollbacks allowed with --on_nonfinite=rollback before the run stops.",
    "stall_timeout_s": "A rank that makes no progress for this many seconds ends the job "
                       "(exit 86) naming the stalled rank; 0 disables. Waits for rank 0's "
                       "checkpoint writes do not count.",
}
ELASTIC_HELP = {
    "elastic": "Elastic training under horovodrun --gloo --min-np N --max-np M "
               "--host-discovery-script S: workers may leave or join; the others go back to "
               "the last commit and continue with the new world (docs/elastic.md). The global "
               "batch stays the same in any world (ranks take shares of it).",
    "elastic_commit_steps": "With --elastic: commit the training state to memory every N "
                            "steps (and at each checkpoint); a lost worker costs at most the "
                            "steps since the last commit.",
}
RUN_RECORDS_HELP = {
    "seed": "Random seed (initialisation, shuffling, augmentation); a seeded run resumed "
            "from a checkpoint reads the batches the uninterrupted run would have.",
    "keep_checkpoints": "Newest checkpoints kept (plus the best).",
    "log_every_n_steps": "Progress line every N global steps.",
    "json_progress": "Also print progress as JSON lines.",
}
SCHEDULE_HELP = {
    "base_learning_rate": "Learning rate per 256 images; the peak is "
                          "base_learning_rate * train_batch_size / 256.",
    "momentum": "SGD (and LARS) momentum.",
    "weight_decay": "L2 weight decay on non-BN weights.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up from 0. Default: the reference's "
                     "choice, 5 of 90 epochs stretched to the run length (--lr_schedule=tpu), "
                     "5 (tpu_2018), or by global batch with --enable_lars (5/5/14/40 epochs "
                     "below 16K/32K/64K/above).",
    "nesterov": "Nesterov momentum for SGD, as the TPU reference (MomentumOptimizer with "
                "use_nesterov=True); --nonesterov for classic momentum. LARS keeps classic "
                "momentum, as the reference's LARSOptimizer.",
    "label_smoothing": "Label smoothing for the cross-entropy.",
}


def define_base(config_cls, flag_values=FLAGS, data_dir=True, mode=True):
    """Data/model dirs, mode, GLOBAL batch sizes and run length (at most one of
    --train_steps / --train_epochs), typed and defaulted by `config_cls`'s fields."""
    helps = {k: v for k, v in BASE_HELP.items()
             if (data_dir or k != "data_dir") and (mode or k != "mode")}
    define_fields(config_cls, helps, flag_values, enums={"mode": MODES})
    for name in ("train_batch_size", "eval_batch_size"):
        _positive(name, flag_values)
        _divisible_by_world(name, flag_values)
    _positive("train_steps", flag_values, allow_none=True)
    _positive("train_epochs", flag_values, allow_none=True)
    flags.register_multi_flags_validator(
        ["train_steps", "train_epochs"],
        lambda v: v["train_steps"] is None or v["train_epochs"] is None,
        message="give --train_steps or --train_epochs, not both", flag_values=flag_values)


def define_performance(flag_values=FLAGS):
    """CPU threading (a `PerformanceConfig`), and the 2018 Intel OpenMP/MKL flags, accepted
    but without effect on TF 2.21 (hooks.runtime.legacy_cpu_notice says so at start)."""
    define_fields(PerformanceConfig, PERFORMANCE_HELP, flag_values)
    for name in ("num_intra_threads", "num_inter_threads", "kmp_blocktime"):
        _non_negative(name, flag_values)


def define_precision(config_cls, flag_values=FLAGS):
    """Compute precision and gradient compression (fields of the entry point's config)."""
    define_fields(config_cls, PRECISION_HELP, flag_values, enums={"precision": PRECISIONS})


def define_distributed(flag_values=FLAGS):
    """Horovod tensor fusion and cycle time, read when Horovod starts (a
    `DistributedConfig`)."""
    define_fields(DistributedConfig, DISTRIBUTED_HELP, flag_values)
    _non_negative("fusion_threshold_mb", flag_values)
    _positive("cycle_time_ms", flag_values, allow_none=True)


def define_faults(config_cls, flag_values=FLAGS):
    """What a run does on divergence and stalls (fields of the entry point's config)."""
    define_fields(config_cls, FAULTS_HELP, flag_values,
                  enums={"on_nonfinite": settings.ON_NONFINITE})
    _non_negative("max_rollbacks", flag_values)
    _non_negative("stall_timeout_s", flag_values)


def define_elastic(config_cls, flag_values=FLAGS):
    """Elastic Horovod (fields of the entry point's config)."""
    define_fields(config_cls, ELASTIC_HELP, flag_values)
    _positive("elastic_commit_steps", flag_values)


def define_run_records(config_cls, flag_values=FLAGS):
    """Seed, checkpoints kept and progress lines (fields of `hooks.settings.Settings`)."""
    define_fields(config_cls, RUN_RECORDS_HELP, flag_values)
    positive(("keep_checkpoints", "log_every_n_steps"), flag_values)


def define_shared(config_cls, flag_values=FLAGS):
    """Every group both entry points have: threads, precision, Horovod, faults, elastic,
    seed and records (`config_cls` extends `hooks.settings.Settings`)."""
    define_performance(flag_values)
    define_precision(config_cls, flag_values)
    define_distributed(flag_values)
    define_faults(config_cls, flag_values)
    define_elastic(config_cls, flag_values)
    define_run_records(config_cls, flag_values)


def define_schedule(config_cls, flag_values=FLAGS):
    """Optimiser and learning-rate basics; the LR scales with the global batch."""
    define_fields(config_cls, SCHEDULE_HELP, flag_values)
    _positive("base_learning_rate", flag_values)
    for name in ("weight_decay", "warmup_epochs"):
        _non_negative(name, flag_values)
    flags.register_validator("momentum", lambda v: 0 <= v < 1,
                             message="--momentum must be in [0, 1)", flag_values=flag_values)
    flags.register_validator("label_smoothing", lambda v: 0 <= v < 1,
                             message="--label_smoothing must be in [0, 1)",
                             flag_values=flag_values)


def positive(names, flag_values=FLAGS, allow_none=False):
    """Register "--NAME must be > 0" validators for several flags."""
    for name in names:
        _positive(name, flag_values, allow_none=allow_none)


# ---------------------------------------------------------------- getters
def fill(cls, flag_values=FLAGS, **overrides):
    """An instance of dataclass `cls` with every field that is a flag taken from the flag
    (by name); other fields keep their default unless given in `overrides`."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(cls)
              if f.name in flag_values}
    values.update(overrides)
    return cls(**values)


def flagfile_text(flag_values, rerun: str, only_if_given=()) -> str:
    """The parsed flags in absl `--flagfile` form, defaults included (a later version with
    other defaults reruns the same run): one `--name=value` line per flag the program
    defined, absl's own left out; the flags in `only_if_given` (e.g. accepted-and-ignored
    TPU flags) only when given. `rerun` is the command the header suggests."""
    lines = ["# The flags of this run, resolved (defaults included). Train it again with",
             f"#   {rerun} --flagfile=THIS_FILE --model_dir=NEW_DIR",
             "# (flags after --flagfile override its lines)."]
    for module, module_flags in sorted(flag_values.flags_by_module_dict().items()):
        if module.startswith(("absl", "tensorflow")):
            continue
        for flag in sorted(module_flags, key=lambda f: f.name):
            if flag.name in only_if_given and not flag.present:
                continue
            lines.append(flag.serialize() or f"# --{flag.name} is unset (None)")
    return "\n".join(lines) + "\n"


def get_performance_config(flag_values=FLAGS) -> PerformanceConfig:
    return fill(PerformanceConfig, flag_values)


def get_distributed_config(flag_values=FLAGS) -> DistributedConfig:
    return fill(DistributedConfig, flag_values)
