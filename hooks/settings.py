"""The settings every task shares, declared once and checked in one place.

Both run configurations (`imagenet.config.RunConfig`, `chexnet.config.ChexnetConfig`)
extend `Settings`; their flags are made from these fields (`flags.define_fields`), and
`hooks.training.runner.run` reads them. Keras-free: the configs are checked before TensorFlow
starts.
"""
import dataclasses

from hooks.errors import ConfigError

PRECISIONS = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "rollback")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Batch, precision, faults, elastic, checkpoints and logging of a run. A task's config
    may give a field another default by declaring it again."""
    # the global batch and its split over ranks
    train_batch_size: int = 1024
    eval_batch_size: int = 1024
    seed: int | None = None
    # precision
    precision: str = "float32"
    fp16_allreduce: bool = False
    fused_bn: bool = True  # TF's fused batch-norm kernel (hooks.state.bn_weights loads both)
    sync_bn: bool = False  # batch statistics over all ranks (hooks.distributed.sync_batchnorm)
    # faults
    on_nonfinite: str = "stop"
    max_rollbacks: int = 3
    stall_timeout_s: float = 600.0  # a slow step on a big CPU node is tens of seconds
    # elastic
    elastic: bool = False
    elastic_commit_steps: int = 10
    # checkpoints and logging
    model_dir: str | None = None
    keep_checkpoints: int = 5
    log_every_n_steps: int = 100
    json_progress: bool = False
    # Not a flag: the run's flags in --flagfile form (flags.flagfile_text), which training
    # writes to MODEL_DIR/flags.txt (hooks.state.run_record); empty for a config made in code.
    flags_text: str = ""


def check(settings: Settings) -> None:
    """ConfigError, naming the flag, for a shared setting no flag parser has checked (a
    config made in code)."""
    for name, choices in (("precision", PRECISIONS), ("on_nonfinite", ON_NONFINITE)):
        if getattr(settings, name) not in choices:
            raise ConfigError(f"--{name}={getattr(settings, name)} is not one of "
                              f"{', '.join(choices)}")
    for name in ("train_batch_size", "eval_batch_size", "elastic_commit_steps",
                 "keep_checkpoints", "log_every_n_steps"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name}={getattr(settings, name)} must be at least 1")
    for name in ("max_rollbacks", "stall_timeout_s"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"--{name}={getattr(settings, name)} must be at least 0")
