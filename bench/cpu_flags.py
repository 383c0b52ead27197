"""What the 2018 CPU settings and today's thread settings do to a conv-net training step on TF 2.21.

    .venv/bin/python -m bench.cpu_flags              (8 cases, 1 round: 2.5-3 min here)
    .venv/bin/python -m bench.cpu_flags --rounds 2 --cases baseline,omp_threads_1,intra_1

The 2018 Intel-optimised command line (`--mkl --kmp_blocktime 1`) set OpenMP variables
(KMP_BLOCKTIME, KMP_AFFINITY, KMP_SETTINGS, OMP_NUM_THREADS) and TF_ENABLE_ONEDNN_OPTS.
Each case sets one of them in the environment of a fresh process (they are read when the
runtime starts), or one TensorFlow thread setting, and trains a small conv net (four 3x3
convolutions with batch norm, 64 px, batch 32, random data, Keras fit) for a few steps.
Per case: images per CPU-second (the robust figure on this capped, shared VM) and
wall-clock images/s side by side, median [min-max] over the timed repeats of all rounds;
the CPU cores the process kept busy (CPU seconds / wall seconds: what the VM gave it); the
intra-op threads TF reports; the threads the process has after training; the OpenMP
runtimes mapped into it. Also printed: whether TensorFlow's own libraries link an OpenMP
runtime (`ldd`; TF 2.21's link none, so the KMP_*/OMP_* variables have nothing in TF to
act on), and `lscpu`'s model and flags. Rounds run the cases in turn (interleaved).
Writes runs/bench/cpu_flags.json.

    python -m bench.cpu_flags --worker '{"intra": 0, ...}'   (what each case starts)
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.cases import add_case_options, case_names  # noqa: E402
from bench.common import Clock, fmt, lscpu, summary, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KMP_AFFINITY_2018 = "granularity=fine,compact,1,0"
# name -> (environment, TF intra-op threads, TF inter-op threads); 0 = TF's default.
CASES = {
    "baseline": ({}, 0, 0),
    "mkl": ({"TF_ENABLE_ONEDNN_OPTS": "1", "KMP_SETTINGS": "1"}, 0, 0),
    "kmp_blocktime_1": ({"KMP_BLOCKTIME": "1"}, 0, 0),
    "kmp_affinity": ({"KMP_AFFINITY": KMP_AFFINITY_2018}, 0, 0),
    "omp_threads_1": ({"OMP_NUM_THREADS": "1"}, 0, 0),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 0, 0),
    "intra_1": ({}, 1, 0),
    "inter_1": ({}, 0, 1),
    # the whole 2018 bundle that `--mkl --kmp_blocktime 1 --num_intra_threads N` exported
    "mkl_2018_all": ({"TF_ENABLE_ONEDNN_OPTS": "1", "KMP_SETTINGS": "1", "KMP_BLOCKTIME": "1",
                      "KMP_AFFINITY": KMP_AFFINITY_2018,
                      "OMP_NUM_THREADS": str(os.cpu_count())}, 0, 0),
    "intra_1_inter_1": ({}, 1, 1),
}
DEFAULT_CASES = ("baseline,mkl,kmp_blocktime_1,kmp_affinity,omp_threads_1,onednn_off,intra_1,"
                 "inter_1")
# Variables a case may set; the parent clears them so every case starts from TF's defaults.
CONTROLLED = ("TF_ENABLE_ONEDNN_OPTS", "KMP_SETTINGS", "KMP_BLOCKTIME", "KMP_AFFINITY",
              "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def run_case(name: str, args, timeout: float = 600) -> dict:
    """One case in a fresh process; returns its RESULT."""
    env_vars, intra, inter = CASES[name]
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(env_vars, PYTHONPATH=ROOT)
    job = {"intra": intra, "inter": inter, "steps": args.steps, "repeats": args.repeats,
           "batch": args.batch, "image_size": args.image_size}
    proc = subprocess.run([sys.executable, "-m", "bench.cpu_flags", "--worker", json.dumps(job)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {name} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["stderr_lines"] = len(proc.stderr.splitlines())  # KMP_SETTINGS would print here
    return result


def _is_openmp(path: str) -> bool:
    return os.path.basename(path).startswith(("libgomp", "libiomp", "libomp"))


def openmp_runtimes() -> list[str]:
    """OpenMP runtime libraries mapped into this process (libgomp, libiomp5, libomp)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    return sorted(p for p in paths if _is_openmp(p))


def tf_openmp_links() -> dict[str, list[str]]:
    """The OpenMP runtimes each of TensorFlow's own shared libraries links (`ldd`)."""
    import importlib.util

    tf_dir = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
    found = {}
    for lib in ("libtensorflow_framework.so.2", "libtensorflow_cc.so.2",
                "python/_pywrap_tensorflow_internal.so"):
        path = os.path.join(tf_dir, lib)
        if os.path.exists(path):
            out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
            found[lib] = [line.split()[0] for line in out.splitlines()
                          if line.strip() and _is_openmp(line.split()[0])]
    return found


def conv_net(image_size: int, num_classes: int = 10):
    """A small conv net: four 3x3 convolutions with batch norm and ReLU (two of stride 2),
    global pooling, dense logits; quick to build and trace, conv-bound to train."""
    import keras
    from keras import layers

    x = inputs = keras.Input((image_size, image_size, 3))
    for filters, stride in ((32, 1), (64, 2), (64, 1), (128, 2)):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    logits = layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, logits)


def worker(job: dict) -> dict:
    """Train `repeats` x `steps` timed steps after a warm-up; wall and CPU per repeat."""
    import keras
    import numpy as np
    import tensorflow as tf

    if job["intra"]:
        tf.config.threading.set_intra_op_parallelism_threads(job["intra"])
    if job["inter"]:
        tf.config.threading.set_inter_op_parallelism_threads(job["inter"])
    net = conv_net(job["image_size"])
    net.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(job["batch"], job["image_size"], job["image_size"], 3))
    data = tf.data.Dataset.from_tensors((images.astype("float32"),
                                         rng.integers(0, 10, job["batch"]))).repeat()
    net.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # tracing, oneDNN primitives
    rounds = []
    for _ in range(job["repeats"]):
        with Clock() as clock:
            net.fit(data, steps_per_epoch=job["steps"], epochs=1, verbose=0)
        images_done = job["steps"] * job["batch"]
        rounds.append({"images_per_cpu_sec": images_done / clock.cpu,
                       "images_per_sec": images_done / clock.wall,
                       "cpu_cores": clock.cpu / clock.wall})
    return {"rounds": rounds, "tf_version": tf.__version__,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "os_threads": len(os.listdir("/proc/self/task")),
            "openmp_runtimes": openmp_runtimes()}


def print_table(results: dict, args, cpu: dict) -> dict:
    table = {}
    for name, runs in results.items():
        rounds = [r for run in runs for r in run["rounds"]]
        table[name] = {k: summary([r[k] for r in rounds])
                       for k in ("images_per_cpu_sec", "images_per_sec", "cpu_cores")}
        last = runs[-1]
        table[name].update({k: last[k] for k in ("intra_op_threads", "os_threads",
                                                 "openmp_runtimes", "stderr_lines")})
    base = table.get("baseline", {}).get("images_per_cpu_sec", {}).get("median")
    print(f"\nTF {runs[-1]['tf_version']}, conv net {args.image_size} px, batch {args.batch}, "
          f"{args.rounds} round(s) x {args.repeats} repeats x {args.steps} steps, "
          f"{os.cpu_count()} CPUs; median [min-max]\nCPU: {cpu.get('model', '?')}")
    print(f"{'case':<16} {'img/CPU-s':>21} {'vs base':>7} {'img/s wall':>21} {'cores':>5} "
          f"{'intra':>5} {'threads':>7}  OpenMP runtime mapped")
    for name, t in table.items():
        ratio = f"{t['images_per_cpu_sec']['median'] / base:7.0%}" if base else f"{'':>7}"
        print(f"{name:<16} {fmt(t['images_per_cpu_sec']):>21} {ratio} "
              f"{fmt(t['images_per_sec']):>21} {t['cpu_cores']['median']:>5.2f} "
              f"{t['intra_op_threads']:>5} {t['os_threads']:>7}"
              f"  {', '.join(map(os.path.basename, t['openmp_runtimes'])) or 'none'}")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(parser, CASES, DEFAULT_CASES, rounds=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    parser.add_argument("--steps", type=int, default=6, help="training steps per repeat")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    names = case_names(parser, args.cases, CASES)
    for name in ("rounds", "repeats", "steps", "batch", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    cpu = lscpu()
    links = tf_openmp_links()
    linked = sorted({lib for libs in links.values() for lib in libs}) or "none"
    print(f"CPU: {cpu.get('model', '?')}\nflags: {cpu.get('flags', '?')}\nOpenMP runtimes "
          f"linked by TensorFlow's libraries (ldd): {linked} ({', '.join(links)})", flush=True)
    results = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(args.rounds):
        for name in names:
            res = run_case(name, args)
            results[name].append(res)
            per_cpu = summary([x["images_per_cpu_sec"] for x in res["rounds"]])
            wall = summary([x["images_per_sec"] for x in res["rounds"]])
            print(f"round {r + 1} {name:<16} {fmt(per_cpu)} img/CPU-s, {fmt(wall)} img/s wall "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    table = print_table(results, args, cpu)
    path = write_json("cpu_flags", {"args": vars(args), "lscpu": cpu, "tf_openmp_links": links,
                                    "cases": {n: CASES[n] for n in names},
                                    "results": results, "summary": table}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
