"""Flag groups: parsing, getters and one-line errors that name the flag."""
import dataclasses

import pytest
from absl import flags as absl_flags

import flags
import resnet_main
from chexnet import __main__ as chexnet_main
from chexnet import config as chexnet_config
from chexnet.config import ChexnetConfig
from hooks import runtime
from hooks.errors import ConfigError
from imagenet.config import RunConfig, validate


def _parse(argv):
    fv = absl_flags.FlagValues()
    resnet_main.define_flags(fv)
    fv(["prog", *argv])
    return fv


def _chexnet_flags():
    fv = absl_flags.FlagValues()
    chexnet_main.define_flags(fv)
    return fv


def test_configs_filled_from_the_2018_command_line():
    fv = _parse(["--data_dir=/d", "--model_dir=/m", "--mode=train", "--train_batch_size=8192",
                 "--train_steps=14075", "--num_intra_threads=24", "--num_inter_threads=2",
                 "--mkl", "--kmp_blocktime=1", "--precision=bfloat16",
                 "--fusion_threshold_mb=64", "--cycle_time_ms=3.5", "--base_learning_rate=0.2",
                 "--warmup_epochs=3", "--fp16_allreduce", "--use_tpu=False"])
    config = flags.fill(RunConfig, fv)
    assert (config.data_dir, config.model_dir, config.mode) == ("/d", "/m", "train")
    assert (config.train_batch_size, config.train_steps, config.train_epochs) == (
        8192, 14075, None)
    assert (config.base_learning_rate, config.warmup_epochs, config.momentum) == (0.2, 3, 0.9)
    assert (config.precision, config.fp16_allreduce) == ("bfloat16", True)
    perf = flags.get_performance_config(fv)
    assert (perf.num_intra_threads, perf.num_inter_threads, perf.mkl,
            perf.kmp_blocktime) == (24, 2, True, 1)
    dist = flags.get_distributed_config(fv)
    assert (dist.fusion_threshold_mb, dist.cycle_time_ms) == (64, 3.5)


def test_2018_command_line_parses_and_validates(tmp_path):
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        (tmp_path / name).write_bytes(b"")
    argv = ["--train_batch_size", "8192", "--train_steps", "14075",
            "--num_intra_threads", "24", "--num_inter_threads", "2", "--mkl=True",
            f"--data_dir={tmp_path}", "--model_dir", "/tmp/unused-2018",
            "--use_tpu=False", "--kmp_blocktime", "1"]
    fv = _parse(argv)
    config = flags.fill(RunConfig, fv)
    validate(config)
    assert (config.train_batch_size, config.train_steps, config.resnet_depth,
            config.data_dir, config.total_steps) == (8192, 14075, 50, str(tmp_path), 14075)
    perf = flags.get_performance_config(fv)
    assert (perf.num_intra_threads, perf.num_inter_threads, perf.mkl, perf.kmp_blocktime) == (
        24, 2, True, 1)


def _fields(*classes):
    return [f for cls in classes for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("entry", ["resnet_main", "chexnet"])
def test_every_flag_is_a_config_field_with_the_same_default(entry):
    if entry == "resnet_main":
        fv = absl_flags.FlagValues()
        resnet_main.define_flags(fv)
        own, unflagged, compat = RunConfig, {"flags_text"}, set(resnet_main.COMPAT_FLAGS)
    else:
        fv = _chexnet_flags()
        own, unflagged, compat = ChexnetConfig, {"mode", "flags_text"}, set()
    fields = _fields(own, flags.PerformanceConfig, flags.DistributedConfig)
    names = [f.name for f in fields]
    assert len(names) == len(set(names)), "a field in two configs"
    assert set(fv) - compat == set(names) - unflagged
    for field in fields:
        if field.name in unflagged:
            continue
        default = fv[field.name].default
        if isinstance(default, list):  # DEFINE_list keeps strings
            default = tuple(float(x) for x in default)
        assert default == field.default, field.name


def test_run_length_is_steps_or_epochs_never_both():
    with pytest.raises(absl_flags.IllegalFlagValueError,
                       match="give --train_steps or --train_epochs, not both"):
        _parse(["--train_steps=10", "--train_epochs=2"])
    with pytest.raises(ConfigError, match="not both"):
        RunConfig(train_steps=10, train_epochs=2.0).total_steps
    assert RunConfig(train_epochs=2.0, num_train_images=100, train_batch_size=10
                     ).total_steps == 20
    assert RunConfig(num_train_images=100, train_batch_size=10).total_steps == 900  # 90 epochs
    with pytest.raises(ConfigError, match="give --train_steps or --train_epochs"):
        chexnet_config.validate(ChexnetConfig(image_dir="/", model_dir="/m"))


@pytest.mark.parametrize("argv, flag", [
    (["--train_batch_size=-4"], "--train_batch_size"),
    (["--eval_batch_size=0"], "--eval_batch_size"),
    (["--precision=float8"], "--precision"),
    (["--num_intra_threads=-1"], "--num_intra_threads"),
    (["--momentum=1.5"], "--momentum"),
    (["--train_steps=0"], "--train_steps"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(absl_flags.IllegalFlagValueError) as err:
        _parse(argv)
    message = str(err.value)
    assert flag in message and "\n" not in message


def test_global_batch_must_divide_by_launcher_ranks(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    with pytest.raises(absl_flags.IllegalFlagValueError,
                       match=r"--train_batch_size=10 \(global\) is not divisible by the 3 ranks"):
        _parse(["--train_batch_size=10", "--eval_batch_size=9"])
    fv = _parse(["--train_batch_size=12", "--eval_batch_size=9"])
    assert fv.train_batch_size == 12


@pytest.mark.parametrize("env, size", [
    ({}, 1), ({"HOROVOD_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
    ({"SLURM_NTASKS": "8"}, 1),  # an allocation, not a step: the batch script itself
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, 8),
])
def test_launcher_world_size(env, size):
    assert flags.launcher_world_size(env) == size


def test_default_batch_is_not_checked_against_ranks(monkeypatch):
    # An evaluation on 3 ranks must not fail on the (unused) default training batch.
    monkeypatch.setenv("HOROVOD_SIZE", "3")
    fv = _parse(["--eval_batch_size=9"])
    assert (fv.train_batch_size, fv.eval_batch_size) == (1024, 9)


def test_bfloat16_warns_only_on_x86_without_bf16_instructions():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    sapphire = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    arm = "Features\t: fp asimd bf16\n"
    assert runtime.native_bf16(avx2) is False and runtime.native_bf16(sapphire) is True
    warning = runtime.precision_warning("bfloat16", avx2)
    assert warning.startswith("--precision=bfloat16 on a CPU without bf16 instructions")
    assert runtime.precision_warning("float32", avx2) is None
    assert runtime.precision_warning("bfloat16", sapphire) is None
    assert runtime.precision_warning("bfloat16", arm) is None  # not x86: nothing known


def test_vgg16_choices_are_named_in_flags_and_checked():
    fv = _parse(["--architecture=vgg16_pooled", "--use_synthetic_data"])
    assert fv.architecture == "vgg16_pooled"
    help_ = fv["architecture"].help
    assert "vgg16_pooled" in help_ and "4096" in help_
    with pytest.raises(absl_flags.IllegalFlagValueError, match="--architecture"):
        _parse(["--architecture=vgg19"])
    for arch in ("vgg16", "vgg16_pooled"):
        with pytest.raises(ConfigError, match=f"--image_size=16: --architecture={arch} .*32"):
            validate(RunConfig(architecture=arch, image_size=16, use_synthetic_data=True))
    validate(RunConfig(architecture="vgg16", image_size=32, use_synthetic_data=True))
    chexnet_help = _chexnet_flags()["backbone"].help
    assert "vgg16_pooled" in chexnet_help and "fc" in chexnet_help
    with pytest.raises(ConfigError, match="--image_size=16: --backbone=vgg16_pooled"):
        chexnet_config.validate(ChexnetConfig(image_dir="/", model_dir="/m", train_steps=1,
                                              backbone="vgg16_pooled", image_size=16,
                                              allow_random_init=True))
