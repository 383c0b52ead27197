"""The 2018 CPU flags on TF 2.21 (hooks.runtime): accepted, said to change nothing in one
line on rank 0, and OMP_NUM_THREADS mapped to TensorFlow's real intra-op setting."""
import json
import subprocess

import pytest

from bench import cpu_flags
from flags import PerformanceConfig
from hooks import runtime
from tests.conftest import ROOT, child_env, horovodrun_cmd, python_cmd, run_cmd

OLD = dict(num_intra_threads=24, num_inter_threads=2, mkl=True, kmp_blocktime=1)


def test_notice_names_each_2018_setting_that_changes_nothing():
    note = runtime.legacy_cpu_notice(PerformanceConfig(**OLD), {})
    assert note.startswith("--mkl=True --kmp_blocktime=1 change nothing (")
    assert "\n" not in note and "OMP_NUM_THREADS" not in note
    note = runtime.legacy_cpu_notice(PerformanceConfig(), {"KMP_AFFINITY": "compact"})
    assert note.startswith("KMP_AFFINITY=compact changes nothing (")
    note = runtime.legacy_cpu_notice(PerformanceConfig(kmp_affinity="x", kmp_settings=False),
                                     {"KMP_BLOCKTIME": "0"})
    assert note.startswith("--kmp_affinity=x --kmp_settings=False KMP_BLOCKTIME=0 change")


def test_no_notice_without_2018_settings():
    assert runtime.legacy_cpu_notice(PerformanceConfig(), {}) is None
    assert runtime.legacy_cpu_notice(PerformanceConfig(num_intra_threads=4,
                                                       num_inter_threads=2), {}) is None
    # the batch scripts set both to the same count: nothing to say
    assert runtime.legacy_cpu_notice(PerformanceConfig(num_intra_threads=4),
                                     {"OMP_NUM_THREADS": "4"}) is None


@pytest.mark.parametrize("flag,env,threads,note", [
    (0, {}, 0, None),
    (0, {"OMP_NUM_THREADS": "3"}, 3, "OMP_NUM_THREADS=3 taken as --num_intra_threads=3"),
    (0, {"OMP_NUM_THREADS": "4,2"}, 4, "OMP_NUM_THREADS=4 taken as --num_intra_threads=4"),
    (0, {"OMP_NUM_THREADS": "many"}, 0, None),
    (0, {"OMP_NUM_THREADS": "0"}, 0, None),
    (2, {"OMP_NUM_THREADS": "3"}, 2, "OMP_NUM_THREADS=3 changes nothing (2 intra-op threads"),
    (2, {"OMP_NUM_THREADS": "2"}, 2, None),
    # TensorFlow's own variable acts (we set nothing), OMP_NUM_THREADS does not
    (0, {"OMP_NUM_THREADS": "3", "TF_NUM_INTRAOP_THREADS": "1"}, 0,
     "OMP_NUM_THREADS=3 changes nothing (1 intra-op threads"),
])
def test_intra_op_threads_from_the_flag_then_omp_num_threads(flag, env, threads, note):
    got, got_note = runtime.intra_op_threads(flag, env)
    assert got == threads
    assert (got_note is None) if note is None else got_note.startswith(note)


CONFIGURE = """
from hooks import runtime
from flags import PerformanceConfig
note = runtime.configure(PerformanceConfig(num_intra_threads={intra}, num_inter_threads=2,
                                           mkl=True, kmp_blocktime=1))
runtime.set_precision("bfloat16")
import json, keras, tensorflow as tf
tf.reduce_sum(tf.ones((64, 64)) @ tf.ones((64, 64)))  # TF's pools now exist
print(json.dumps([tf.config.threading.get_intra_op_parallelism_threads(),
                  tf.config.threading.get_inter_op_parallelism_threads(),
                  keras.mixed_precision.global_policy().name, note]))
"""


@pytest.mark.slow  # starts subprocesses that import TensorFlow
@pytest.mark.parametrize("intra,omp,expected", [(0, "3", 3), (1, "3", 1), (0, None, 0)])
def test_configure_sets_tensorflows_threads(intra, omp, expected):
    env = {k: v for k, v in child_env().items()
           if k not in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    proc = subprocess.run(python_cmd("-c", CONFIGURE.format(intra=intra)), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads, inter, policy, note = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (threads, inter, policy) == (expected, 2, "mixed_bfloat16")
    assert note.startswith("--mkl=True --kmp_blocktime=1 change nothing")
    if omp and not intra:
        assert note.endswith(f"; OMP_NUM_THREADS={omp} taken as --num_intra_threads={omp}")


@pytest.mark.distributed
def test_the_2018_command_line_runs_and_says_once_what_changes_nothing(tmp_path):
    """horovodrun -np 2 with the 2018 CPU flags and KMP_AFFINITY: the run trains, one note
    (from rank 0), and no TensorFlow start-up line from either rank."""
    proc = run_cmd(horovodrun_cmd(
        2, "resnet_main.py", "--use_synthetic_data", "--mode=train", "--resnet_depth=18",
        "--image_size=32", "--num_label_classes=10", "--train_batch_size=4",
        "--train_steps=2", "--iterations_per_loop=2", "--num_train_images=40",
        f"--model_dir={tmp_path}", "--num_intra_threads", "1", "--num_inter_threads", "1",
        "--mkl=True", "--use_tpu=False", "--kmp_blocktime", "1"),
        timeout=600, KMP_AFFINITY="granularity=fine,compact,1,0")
    out = proc.stdout + proc.stderr
    notes = [line for line in out.splitlines() if "resnet_main: note:" in line]
    assert len(notes) == 1, out
    assert notes[0].startswith("[0]<stderr>:resnet_main: note: --mkl=True --kmp_blocktime=1 "
                               "KMP_AFFINITY=granularity=fine,compact,1,0 change nothing (")
    assert "SUMMARY" in out
    # the ranks' lines ("[0]<stderr>:..."); horovodrun's own check of its build imports TF
    # and prints the lines (make demo runs it under python -m hooks.stderr_filter)
    ranks = "\n".join(line for line in out.splitlines() if line.startswith("["))
    assert not any(p in ranks for p in ("absl::InitializeLog", "oneDNN custom operations"))


def test_benchmark_cases_start_from_tensorflows_defaults():
    """Every variable a case sets is cleared for the others (a case measures one thing)."""
    for env, _, _ in cpu_flags.CASES.values():
        assert set(env) <= set(cpu_flags.CONTROLLED)
    assert cpu_flags.CASES["baseline"] == ({}, 0, 0)
    assert set(cpu_flags.DEFAULT_CASES.split(",")) <= set(cpu_flags.CASES)


@pytest.mark.slow  # the benchmark starts a process per case
def test_benchmark_measures_a_case_quietly(tmp_path):
    """One short case end to end: a result per case with TF's real thread setting, and no
    TensorFlow start-up line from the benchmark or its worker."""
    out = tmp_path / "cpu_flags.json"
    proc = run_cmd(python_cmd("-m", "bench.cpu_flags", "--cases", "intra_1", "--repeats", "1",
                              "--steps", "1", "--batch", "4", "--image_size", "16",
                              "--out", out), timeout=300)
    text = proc.stdout + proc.stderr
    assert not any(p in text for p in ("absl::InitializeLog", "oneDNN custom operations"))
    result = json.loads(out.read_text())
    run = result["results"]["intra_1"][0]
    assert run["intra_op_threads"] == 1 and len(run["rounds"]) == 1
    assert run["rounds"][0]["images_per_cpu_sec"] > 0
    assert result["lscpu"].get("model")
