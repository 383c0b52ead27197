"""Flag groups: parsing, getters and one-line errors that name the flag."""
import pytest
from absl import flags as absl_flags

import flags
from hooks import runtime


def _parse(argv, world_env=None, monkeypatch=None):
    fv = absl_flags.FlagValues()
    flags.define_base(fv)
    flags.define_performance(fv)
    flags.define_distributed(fv)
    flags.define_schedule(fv)
    fv(["prog", *argv])
    return fv


def test_getters_build_configs_from_argv():
    fv = _parse(["--data_dir=/d", "--model_dir=/m", "--mode=train", "--train_batch_size=8192",
                 "--train_steps=14075", "--num_intra_threads=24", "--num_inter_threads=2",
                 "--mkl", "--kmp_blocktime=1", "--precision=bfloat16",
                 "--fusion_threshold_mb=64", "--cycle_time_ms=3.5", "--base_learning_rate=0.2",
                 "--warmup_epochs=3"])
    base = flags.get_base_config(fv)
    assert (base.data_dir, base.model_dir, base.mode) == ("/d", "/m", "train")
    assert (base.train_batch_size, base.train_steps, base.train_epochs) == (8192, 14075, None)
    perf = flags.get_performance_config(fv)
    assert (perf.num_intra_threads, perf.num_inter_threads, perf.mkl, perf.kmp_blocktime,
            perf.precision) == (24, 2, True, 1, "bfloat16")
    dist = flags.get_distributed_config(fv)
    assert (dist.fusion_threshold_mb, dist.cycle_time_ms, dist.fp16_allreduce) == (64, 3.5, False)
    sched = flags.get_schedule_config(fv)
    assert (sched.base_learning_rate, sched.warmup_epochs, sched.momentum) == (0.2, 3, 0.9)


def test_groups_register_only_what_is_asked():
    fv = absl_flags.FlagValues()
    flags.define_base(fv, mode=False, train_epochs=False)
    assert "mode" not in fv and "train_epochs" not in fv and "train_batch_size" in fv
    assert "num_intra_threads" not in fv


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


def test_mkl_environment_follows_the_2018_command_line():
    env = runtime.cpu_environment(mkl=True, num_intra_threads=24, kmp_blocktime=1,
                                  kmp_affinity="granularity=fine,compact,1,0",
                                  kmp_settings=True)
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "1", "KMP_BLOCKTIME": "1",
                   "KMP_AFFINITY": "granularity=fine,compact,1,0", "KMP_SETTINGS": "1",
                   "OMP_NUM_THREADS": "24"}
    assert runtime.cpu_environment(False, 24, 1, "x", True) == {}


def test_default_batch_is_not_checked_against_ranks(monkeypatch):
    # An evaluation on 3 ranks must not fail on the (unused) default training batch.
    monkeypatch.setenv("HOROVOD_SIZE", "3")
    fv = _parse(["--eval_batch_size=9"])
    assert (fv.train_batch_size, fv.eval_batch_size) == (1024, 9)
