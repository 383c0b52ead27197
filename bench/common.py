"""Shared helpers of the benchmarks: CPU time, robust summaries, JSON output.

This VM's host caps its CPU time: wall-clock rounds often read exactly 3.13 or 6.25 img/s
whatever ran. CPU seconds do not grow while the host holds the VM back, so every benchmark
reports work per CPU-second (process CPU time, all threads, plus waited-for children) with
wall-clock beside it, from interleaved rounds, as median and spread.
"""
import json
import os
import resource
import statistics
import time
from collections.abc import Sequence

RUNS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs",
                        "bench")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class Clock:
    """Wall and CPU seconds spent inside a `with` block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = cpu_seconds() - self.cpu
        return False


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and spread ((max - min) / median, in percent) of the rounds."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0,
            "rounds": len(values)}


def fmt(s: dict[str, float], digits: int = 2) -> str:
    """'median [min-max]' of a summary()."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def write_json(name: str, payload: dict, path: str = None) -> str:
    """Writes the benchmark's result under runs/bench/ (or `path`); returns the path."""
    path = path or os.path.join(RUNS_DIR, name + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = dict(payload, date=time.strftime("%Y-%m-%d %H:%M:%S"), cpus=os.cpu_count())
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def print_round(r: int, name: str, width: int, wall: float, per_cpu: float) -> None:
    """The line of one interleaved round of one case: images/s wall, then per CPU-second."""
    print(f"round {r + 1} {name:<{width}} {wall:6.2f} img/s {per_cpu:6.2f} img/CPU-s",
          flush=True)


def finish(name: str, payload: dict, path: str = None, bench: dict = None) -> str:
    """write_json(), then 'wrote PATH' and, given `bench`, a 'BENCH {json}' line."""
    path = write_json(name, payload, path)
    print(f"wrote {path}")
    if bench is not None:
        print("BENCH " + json.dumps(bench))
    return path


def fraction_of_limit(images_per_cpu_s: float, flop_per_image: float,
                      limit_gflop_per_cpu_s: float) -> float:
    """The share of the measured FLOP limit that a throughput uses: images per CPU-second x
    FLOP per image, over the limit in GFLOP per CPU-second."""
    if limit_gflop_per_cpu_s <= 0:
        raise ValueError(f"limit must be > 0, got {limit_gflop_per_cpu_s}")
    return images_per_cpu_s * flop_per_image / 1e9 / limit_gflop_per_cpu_s


def forward_macs(model) -> int:
    """Multiply-adds of one forward pass of a built Keras model, for one image: every
    Conv2D (out_h x out_w x k_h x k_w x C_in / groups x C_out), DepthwiseConv2D and Dense
    layer, nested models included. Batch norm, pooling and activations are not counted
    (their FLOP are a few percent of a CNN's and not GEMM work)."""
    import keras

    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in_per_group, _ = layer.kernel.shape
            total += h * w * kh * kw * c_in_per_group * c_out
        elif isinstance(layer, keras.layers.Dense):
            c_in, c_out = layer.kernel.shape
            total += c_in * c_out
    return int(total)



def lscpu() -> dict[str, str]:
    """`lscpu`'s model name, flags and CPU count ({} where lscpu is missing): which
    instructions the kernels could use, recorded with every result."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key: fields[name].strip() for key, name in
            (("model", "Model name"), ("flags", "Flags"), ("cpus", "CPU(s)"))
            if name in fields}
