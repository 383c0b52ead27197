"""TensorFlow's C++ start-up lines are gone from what our programs print (hooks.entry,
hooks.stderr_filter), and nothing else is: real subprocesses, their stdout + stderr read.

The start-up lines are recognised here by their own fixed phrases (what TF 2.21 printed on
this machine), not by the filter's patterns.
"""
import os
import signal
import subprocess
import threading
import time

import pytest

from hooks import stderr_filter
from tests.conftest import ROOT, SHARED_DATA, child_env, python_cmd

# Verbatim from `import tensorflow` on TF 2.21 (AVX-512 host, TF_CPP_MIN_LOG_LEVEL=0).
ABSL = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = (b"I0000 00:00:1796607117.125126   15691 port.cc:153] oneDNN custom operations are "
          b"on. You may see slightly different numerical results due to floating-point "
          b"round-off errors from different computation orders. To turn them off, set the "
          b"environment variable `TF_ENABLE_ONEDNN_OPTS=0`.")
GUARD = (b"I0000 00:00:1796607117.236739   15691 cpu_feature_guard.cc:227] This TensorFlow "
         b"binary is optimized to use available CPU instructions in performance-critical "
         b"operations.")
GUARD_2 = (b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI FMA, in other "
           b"operations, rebuild TensorFlow with the appropriate compiler flags.")
PHRASES = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard",
           "This TensorFlow binary is optimized", "rebuild TensorFlow with the appropriate")
# A short real training run: imports TensorFlow, builds a ResNet-18, trains 2 steps.
RESNET_TINY = ["resnet_main.py", "--use_synthetic_data", "--mode=train", "--resnet_depth=18",
               "--image_size=32", "--num_label_classes=10", "--train_batch_size=4",
               "--train_steps=2", "--iterations_per_loop=2", "--num_train_images=40"]


def startup_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p in line for p in PHRASES)]


def quiet_env(**extra):
    """The children's environment without any setting of ours that hides log lines."""
    env = child_env(**extra)
    for var in ("TF_CPP_MIN_LOG_LEVEL", "HPC_RESNET_VERBOSE"):
        if var not in extra:
            env.pop(var, None)
    return env


def run_py(args, timeout=300, **extra):
    """Run python with `args` in the repo; (returncode, stdout + stderr as text)."""
    proc = subprocess.run(python_cmd(*args), cwd=ROOT, env=quiet_env(**extra),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace")


# ---------------------------------------------------------------- the filter itself
@pytest.mark.parametrize("line", [ABSL, ONEDNN, GUARD, GUARD_2, ONEDNN + b"\r"])
def test_known_startup_lines_are_recognised(line):
    assert stderr_filter.is_startup_line(line)


@pytest.mark.parametrize("line", [
    b"",
    ABSL + b" (and more)",
    b"  " + ABSL,
    ONEDNN.replace(b"are on", b"are off"),
    ONEDNN.replace(b"port.cc", b"other.cc"),
    b"E0000 00:00:1796607117.125126   15691 port.cc:153] could not open file",
    b"W0000 00:00:1796607117.125126   15691 cpu_feature_guard.cc:227] something else",
    b"Traceback (most recent call last):",
    b"resnet_main: error: --train_batch_size=5 must divide by 2 ranks",
])
def test_other_lines_are_not(line):
    assert not stderr_filter.is_startup_line(line)


def _filtered(chunks, pause=0.0):
    """What stderr_filter.run passes on when `chunks` are written into its pipe."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()

    def feed():
        for chunk in chunks:
            os.write(src_w, chunk)
            time.sleep(pause)
        os.close(src_w)

    feeder = threading.Thread(target=feed)
    feeder.start()
    collected = []
    reader = threading.Thread(target=lambda: collected.append(os.fdopen(dst_r, "rb").read()))
    reader.start()
    stderr_filter.run(src_r, dst_w)
    os.close(dst_w)
    os.close(src_r)
    feeder.join(timeout=60)
    reader.join(timeout=60)
    return collected[0]


def test_run_drops_only_startup_lines_and_keeps_order():
    out = _filtered([b"first\n" + ABSL + b"\n" + ONEDNN + b"\nsec", b"ond\n" + GUARD + b"\n"
                     + GUARD_2 + b"\n", ABSL + b"\nTraceback (x)\nno newline at the end"])
    assert out == b"first\nsecond\nTraceback (x)\nno newline at the end"


def test_run_passes_a_partial_line_on_before_its_end():
    """A prompt without a newline is not held back until more output comes."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    worker = threading.Thread(target=stderr_filter.run, args=(src_r, dst_w))
    worker.start()
    try:
        os.write(src_w, b"Password: ")
        assert os.read(dst_r, 100) == b"Password: "  # blocks until the filter passes it on
    finally:
        os.close(src_w)
        worker.join(timeout=60)
        for fd in (src_r, dst_r, dst_w):
            os.close(fd)
    assert not worker.is_alive()


# ---------------------------------------------------------------- real programs
@pytest.mark.slow  # two short resnet_main runs
def test_resnet_main_run_prints_no_startup_line_unless_verbose(tmp_path):
    rc, out = run_py([*RESNET_TINY, f"--model_dir={tmp_path / 'quiet'}"])
    assert rc == 0, out
    assert "SUMMARY" in out  # it did train
    assert startup_lines(out) == []

    rc, out = run_py([*RESNET_TINY, f"--model_dir={tmp_path / 'verbose'}"],
                     HPC_RESNET_VERBOSE="1")
    assert rc == 0, out
    # TF 2.21 prints the absl warning and the oneDNN notice once per library (2 each)
    assert len([line for line in startup_lines(out) if "oneDNN" in line]) >= 1, out
    assert len([line for line in startup_lines(out) if "absl::" in line]) >= 1, out


@pytest.mark.slow  # a short chexnet fine-tune and a TFRecord build, in subprocesses
def test_chexnet_train_and_tfrecord_builder_print_no_startup_line(tmp_path):
    chest = SHARED_DATA / "chestxray14"
    if not (chest / "images").is_dir():
        pytest.fail(f"shared ChestX-ray14 sample not found under {chest}")
    rc, out = run_py(["-m", "chexnet", "train", f"--csv={chest / 'Data_Entry_2017.csv.gz'}",
                      f"--image_dir={chest / 'images'}", "--only_present_images",
                      "--split_fractions=0.6,0.2,0.2", "--backbone=resnet18",
                      "--image_size=32", "--train_batch_size=4", "--eval_batch_size=4",
                      "--train_steps=1", "--allow_random_init",
                      f"--model_dir={tmp_path / 'chexnet'}"])
    assert rc == 0, out
    assert startup_lines(out) == []

    from imagenet import sample_images
    images, synsets = sample_images.generate(str(tmp_path / "gen"), num_classes=2,
                                             per_class=2, size=16)
    rc, out = run_py(["-m", "imagenet.build_tfrecords", f"--input_dir={images}",
                      f"--output_dir={tmp_path / 'records'}", "--split=train",
                      f"--synsets_file={synsets}", "--num_shards=1"])
    assert rc == 0, out
    assert list((tmp_path / "records").glob("train-*"))
    assert startup_lines(out) == []


GENUINE = """
import sys, warnings
from hooks import entry
entry.quiet_startup()
import tensorflow as tf
print("FILTER_PID", __import__("hooks.stderr_filter").stderr_filter._filter.pid, flush=True)
tf.print("a genuine TF error line", output_stream=tf.compat.v1.logging.error)
warnings.warn("a genuine Python warning")
print("a plain stderr line", file=sys.stderr)
raise RuntimeError("a genuine traceback")
"""


@pytest.mark.slow  # starts a subprocess that imports TensorFlow
def test_genuine_warnings_and_errors_still_get_through():
    rc, out = run_py(["-c", GENUINE])
    assert rc == 1
    assert startup_lines(out) == []
    lines = out.splitlines()
    # a C++ LOG(ERROR) from TensorFlow (the PrintV2 kernel), not a start-up line
    assert any(line.startswith("E") and "a genuine TF error line" in line for line in lines), out
    assert any("UserWarning: a genuine Python warning" in line for line in lines), out
    assert "a plain stderr line" in lines
    assert lines[-1] == "RuntimeError: a genuine traceback"
    assert "Traceback (most recent call last):" in lines
    _assert_gone(int(next(x for x in lines if x.startswith("FILTER_PID")).split()[1]))


@pytest.mark.slow  # starts a subprocess
def test_user_error_one_liner_gets_through(tmp_path):
    rc, out = run_py(["resnet_main.py", f"--data_dir={tmp_path / 'missing'}",
                      f"--model_dir={tmp_path / 'run'}"])
    assert rc == 1
    assert out.splitlines()[-1].startswith("resnet_main: error: ")
    assert str(tmp_path / "missing") in out.splitlines()[-1]


@pytest.mark.slow  # starts subprocesses
@pytest.mark.parametrize("how", ["abort", "segfault"])
def test_last_words_of_a_crashing_process_are_not_lost(how):
    """What a process writes to stderr just before it dies by a signal still arrives (a
    filter thread inside the process would die with it)."""
    crash = {"abort": "os.abort()", "segfault": "import ctypes; ctypes.string_at(0)"}[how]
    script = ("import os, faulthandler\nfrom hooks import entry\nentry.quiet_startup()\n"
              "faulthandler.enable()\n"
              "os.write(2, b'last words\\n' + b'x' * 20000 + b'\\nreally last\\n')\n" + crash)
    rc, out = run_py(["-c", script], timeout=120)
    assert rc < 0 or rc > 128, out  # died by the signal
    lines = out.splitlines()
    assert "last words" in lines and "really last" in lines, out[-2000:]
    if how == "segfault":
        assert "Fatal Python error: Segmentation fault" in out


@pytest.mark.slow  # starts a subprocess
def test_ctrl_c_to_the_whole_job_keeps_its_traceback():
    """SIGINT to the process group (Ctrl-C, a launcher ending a job) reaches the filter
    too: it must outlive the program and pass on the KeyboardInterrupt traceback."""
    script = ("import sys, time\nfrom hooks import entry\nentry.quiet_startup()\n"
              "from hooks import stderr_filter\n"
              "print('ready', stderr_filter._filter.pid, flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen(python_cmd("-c", script), cwd=ROOT, env=quiet_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        ready = proc.stdout.readline().split()  # waits for the program to be running
        assert ready[:1] == [b"ready"], ready
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    err = err.decode()
    # the program's own traceback, and no trace of the filter's
    assert 'File "<string>", line ' in err, err
    assert err.splitlines()[-1] == "KeyboardInterrupt", err
    assert "stderr_filter" not in err, err
    _assert_gone(int(ready[1]))


def _assert_gone(pid, seconds=30):
    """The filter process ends once the program it served has ended (a zombie waiting for
    its new parent to reap it counts as ended)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    pytest.fail(f"filter process {pid} still running {seconds} s after its program ended")


def test_verbose_or_a_test_dict_changes_nothing_else():
    from hooks import entry
    env = {"HPC_RESNET_VERBOSE": "1"}
    entry.quiet_startup(env)
    assert env == {"HPC_RESNET_VERBOSE": "1"}
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
    entry.quiet_startup(env)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0"}  # the user's own level is kept
    env = {}
    entry.quiet_startup(env)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "2"}
    assert stderr_filter._filter is None  # a dict is not this process: no filter


SLOW_FILTER = """
import os, signal, subprocess, sys
from hooks import entry, stderr_filter
entry.quiet_startup()
pid = stderr_filter._filter.pid
print(pid, flush=True)
os.kill(pid, signal.SIGSTOP)  # the filter falls behind: it resumes 1 s after we exit
subprocess.Popen(["sh", "-c", f"sleep 1; kill -CONT {pid}"], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
sys.stderr.write("last line\\n")
sys.exit("bye")
"""


@pytest.mark.slow  # starts subprocesses
def test_a_programs_last_lines_are_out_when_it_has_exited(tmp_path):
    """The program waits at exit for the filter to pass its last lines on (stderr to a
    file, read as soon as the program has ended), so a shell prompt or a script's next
    command cannot overtake them."""
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.run(python_cmd("-c", SLOW_FILTER), cwd=ROOT, env=quiet_env(),
                              stdout=subprocess.PIPE, stderr=err, timeout=120)
    assert proc.returncode == 1
    assert (tmp_path / "err").read_bytes() == b"last line\nbye\n"
    _assert_gone(int(proc.stdout.split()[0]))
