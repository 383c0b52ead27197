"""tensorflow/tpu resnet_main.py flags that this CPU/Horovod version has no use for.

So that a TPU command line runs unchanged, every flag of the reference (its own, and those
of hyperparameters/common_tpu_flags.py and common_hparams_flags.py) is accepted:

* `IGNORED`: TPU/Cloud-only settings, or settings that have no effect without a feature
  this version does not have. Accepted with any value; when given, the entry point prints
  one warning line per flag (`ignored_warnings`).
* `REFUSED`: settings whose meaning this version cannot honour (DropBlock, AutoAugment /
  RandAugment, pre-activation ResNet, EvoNorm, Cloud Bigtable input, YAML overrides,
  --use_tpu, channels_first). Their harmless default is accepted; any other value is a
  one-line flag error naming the flag.

The reference flags this version honours are ordinary config fields (`--num_parallel_calls`,
`--use_cache`, `--eval_after_training`, ...), and `--log_step_count_steps` is the
reference's name of `--log_every_n_steps` (`ALIASES`). None of the flags here reach a config.
"""
import sys

from absl import flags

from flags.core import launcher_rank

_TPU = "a Cloud TPU setting"
_SERVING = "a TPU-serving export setting (the export here is a .keras file)"
_BIGTABLE = "a Cloud Bigtable input setting (input here is --data_dir TFRecords)"

# name -> (absl definer, reference default, why it is ignored)
IGNORED = {
    "tpu": (flags.DEFINE_string, None, _TPU),
    "gcp_project": (flags.DEFINE_string, None, _TPU),
    "tpu_zone": (flags.DEFINE_string, None, _TPU),
    "eval_master": (flags.DEFINE_string, None, _TPU),
    "num_cores": (flags.DEFINE_integer, None, _TPU + " (ranks come from the launcher)"),
    "transpose_input": (flags.DEFINE_boolean, None, _TPU + " (a TPU layout optimisation)"),
    "skip_host_call": (flags.DEFINE_boolean, None,
                       _TPU + " (progress and TensorBoard are written every loop)"),
    "use_async_checkpointing": (flags.DEFINE_boolean, None,
                                _TPU + " (checkpoints are written by rank 0 every loop)"),
    "profile_every_n_steps": (flags.DEFINE_integer, 0, "the Cloud TPU profiler"),
    "eval_timeout": (flags.DEFINE_integer, None,
                     "continuous evaluation (--mode=eval evaluates the newest checkpoint "
                     "once)"),
    "export_to_tpu": (flags.DEFINE_boolean, False, _SERVING),
    "add_warmup_requests": (flags.DEFINE_boolean, False, _SERVING),
    "model_name": (flags.DEFINE_string, "resnet", _SERVING),
    "inference_batch_sizes": (flags.DEFINE_multi_integer, [8], _SERVING),
    "export_moving_average": (flags.DEFINE_boolean, False,
                              "moving-average export (no moving-average weights are kept)"),
    "bigtable_project": (flags.DEFINE_string, None, _BIGTABLE),
    "bigtable_table": (flags.DEFINE_string, "imagenet", _BIGTABLE),
    "bigtable_train_prefix": (flags.DEFINE_string, "train_", _BIGTABLE),
    "bigtable_eval_prefix": (flags.DEFINE_string, "validation_", _BIGTABLE),
    "bigtable_column_family": (flags.DEFINE_string, "tfexample", _BIGTABLE),
    "bigtable_column_qualifier": (flags.DEFINE_string, "example", _BIGTABLE),
    "dropblock_keep_prob": (flags.DEFINE_float, None,
                            "DropBlock (no effect without --dropblock_groups)"),
    "dropblock_size": (flags.DEFINE_integer, None,
                       "DropBlock (no effect without --dropblock_groups)"),
    "randaug_num_layers": (flags.DEFINE_integer, None,
                           "RandAugment (no effect without --augment_name)"),
    "randaug_magnitude": (flags.DEFINE_integer, None,
                          "RandAugment (no effect without --augment_name)"),
}

# name -> (absl definer, reference default, why a value other than an empty one fails)
REFUSED = {
    "use_tpu": (flags.DEFINE_boolean, False, "this resnet_main runs on CPUs with Horovod"),
    "data_format": (flags.DEFINE_string, "channels_last",
                    "TensorFlow's CPU pooling kernels need channels_last"),
    "dropblock_groups": (flags.DEFINE_string, None,
                         "DropBlock is not implemented in this CPU version"),
    "pre_activation": (flags.DEFINE_boolean, None, "only the reference's default ResNet "
                       "v1.5 is built here (no pre-activation ResNet v2)"),
    "norm_act_layer": (flags.DEFINE_string, None, "only bn_relu is implemented (no EvoNorm)"),
    "augment_name": (flags.DEFINE_string, None,
                     "AutoAugment/RandAugment are not implemented in this CPU version"),
    "bigtable_instance": (flags.DEFINE_string, None, "Cloud Bigtable input is not supported; "
                          "convert to TFRecords (imagenet.build_tfrecords), pass --data_dir"),
    "config_file": (flags.DEFINE_string, None,
                    "YAML parameter files are not read; pass the values as flags"),
    "params_override": (flags.DEFINE_string, None,
                        "parameter overrides are not read; pass the values as flags"),
}
# Besides None, "" and False, these values are accepted (they are what is built here).
ACCEPTED = {"data_format": ("channels_last",), "norm_act_layer": ("bn_relu",)}

# reference name -> our flag
ALIASES = {"log_step_count_steps": "log_every_n_steps"}

NAMES = tuple(IGNORED) + tuple(REFUSED) + tuple(ALIASES)


def define(flag_values=flags.FLAGS) -> None:
    """Registers the IGNORED and REFUSED flags and the ALIASES (after their targets)."""
    for name, (define_flag, default, why) in IGNORED.items():
        define_flag(name, default, f"tensorflow/tpu flag, ignored here: {why}.",
                    flag_values=flag_values)
    for name, (define_flag, default, why) in REFUSED.items():
        define_flag(name, default, f"tensorflow/tpu flag; only its default is accepted: {why}.",
                    flag_values=flag_values)
        flags.register_validator(
            name, lambda v, ok=ACCEPTED.get(name, ()): not v or v in ok,
            flag_values=flag_values, message=f"--{name} is not supported: {why}")
    for alias, target in ALIASES.items():
        flags.DEFINE_alias(alias, target, flag_values=flag_values)


def ignored_warnings(flag_values=flags.FLAGS) -> list[str]:
    """One line per IGNORED flag given on the command line."""
    return [f"warning: --{name}={flag_values[name].value} ignored: {IGNORED[name][2]}"
            for name in IGNORED if flag_values[name].present]


def warn_ignored(prog: str, flag_values=flags.FLAGS, stream=None, environ=None) -> None:
    """Prints `ignored_warnings` to stderr, once per job (on the launcher's rank 0)."""
    if launcher_rank(environ) != 0:
        return
    for line in ignored_warnings(flag_values):
        print(f"{prog}: {line}", file=stream or sys.stderr, flush=True)
