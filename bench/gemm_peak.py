"""This CPU's achievable FLOP rate through TensorFlow/oneDNN: GEMM and convolution, fp32 and bf16.

    .venv/bin/python -m bench.gemm_peak [--rounds 3] [--size 2048] [--reps 4] [--threads 0]
    .venv/bin/python -m bench.gemm_peak --backward --rounds 2 --reps 1   # + training kernels

Cases, interleaved in every round: `tf.matmul` of two size x size matrices (2 size^3 FLOP)
and a ResNet-50 3x3 convolution (batch 32, 28x28, 128 -> 128 channels, stride 1: the
bottleneck of stage 2; 2 N H W k^2 C_in C_out FLOP), each in float32 and bfloat16. Prints
GFLOP per CPU-second (the robust figure on this capped VM) and GFLOP/s wall-clock, median
and [min-max] over the rounds, and the ResNet-50 training images per CPU-second that the
best rate allows (24.5 GFLOP per 224 px training image, imagenet.scaling). Writes
runs/bench/gemm_peak.json. Other benchmarks call `measure` to quote their throughput as a
fraction of the limit measured in the same run. `--backward` adds the convolution's
input- and filter-gradient kernels (what training runs besides the forward pass); the limit
stays the best forward case.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import Clock, fmt, summary, write_json  # noqa: E402
from imagenet.scaling import RESNET50_TRAIN_FLOP_PER_IMAGE  # noqa: E402

CONV_SHAPE = (32, 28, 28, 128, 128, 3)  # batch, height, width, C_in, C_out, kernel


def _cases(size: int, backward: bool = False):
    """{name: (callable running the op once, FLOP per call)}; inputs built once. `backward`
    adds the convolution's two training kernels (input and filter gradients, the same FLOP
    as the forward pass each)."""
    import tensorflow as tf
    n, h, w, cin, cout, k = CONV_SHAPE
    out = {}
    for dtype, tag in ((tf.float32, "fp32"), (tf.bfloat16, "bf16")):
        a = tf.cast(tf.random.normal([size, size]), dtype)
        b = tf.cast(tf.random.normal([size, size]), dtype)
        x = tf.cast(tf.random.normal([n, h, w, cin]), dtype)
        f = tf.cast(tf.random.normal([k, k, cin, cout]) * 0.05, dtype)
        out[f"matmul_{tag}"] = (lambda a=a, b=b: tf.matmul(a, b), 2.0 * size ** 3)
        out[f"conv3x3_{tag}"] = (lambda x=x, f=f: tf.nn.conv2d(x, f, 1, "SAME"),
                                 2.0 * n * h * w * k * k * cin * cout)
        if backward:
            dy = tf.cast(tf.random.normal([n, h, w, cout]), dtype)
            out[f"conv3x3_bwd_input_{tag}"] = (
                lambda f=f, dy=dy: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=[n, h, w, cin], filter=f, out_backprop=dy,
                    strides=[1, 1, 1, 1], padding="SAME"),
                2.0 * n * h * w * k * k * cin * cout)
            out[f"conv3x3_bwd_filter_{tag}"] = (
                lambda x=x, dy=dy: tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=[k, k, cin, cout], out_backprop=dy,
                    strides=[1, 1, 1, 1], padding="SAME"),
                2.0 * n * h * w * k * k * cin * cout)
    return out


def measure(rounds: int = 3, size: int = 2048, reps: int = 4, cases=None, log=print) -> dict:
    """{case: {"gflop_per_cpu_s": summary, "gflop_per_s": summary}} from interleaved rounds."""
    cases = cases or _cases(size)
    for fn, _ in cases.values():
        fn().numpy()  # first call: oneDNN primitive creation
    per_cpu = {name: [] for name in cases}
    wall = {name: [] for name in cases}
    for r in range(rounds):
        for name, (fn, flop) in cases.items():
            with Clock() as c:
                for _ in range(reps):
                    y = fn()
                y.numpy()
            per_cpu[name].append(reps * flop / c.cpu / 1e9)
            wall[name].append(reps * flop / c.wall / 1e9)
            if log:
                log(f"round {r + 1} {name:<24} {per_cpu[name][-1]:7.1f} GFLOP/CPU-s "
                    f"{wall[name][-1]:7.1f} GFLOP/s wall")
    return {name: {"gflop_per_cpu_s": summary(per_cpu[name]), "gflop_per_s": summary(wall[name])}
            for name in cases}


def cpu_features() -> dict:
    """The vector ISA that decides the peak: AVX-512 and native bf16 (AVX512_BF16, AMX)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    flags = set(info.get("flags", "").split())
    return {"model": info.get("model name", "?"), "family": info.get("cpu family", "?"),
            "model_number": info.get("model", "?"), "mhz": info.get("cpu MHz", "?"),
            **{f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")}}


def best_per_cpu_second(result: dict, tag: str) -> float:
    """The highest median GFLOP per CPU-second among the forward cases of one precision
    (the limit; the backward kernels of `--backward` are reported beside it)."""
    return max(v["gflop_per_cpu_s"]["median"] for k, v in result.items()
               if k.endswith(tag) and "_bwd_" not in k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048, help="matrix size")
    parser.add_argument("--reps", type=int, default=4, help="ops per case per round")
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: TF's)")
    parser.add_argument("--backward", action="store_true",
                        help="also the convolution's input- and filter-gradient kernels")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    for name in ("rounds", "size", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    import tensorflow as tf
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    result = measure(args.rounds, args.size, args.reps, cases=_cases(args.size, args.backward))
    gflop = RESNET50_TRAIN_FLOP_PER_IMAGE / 1e9
    features = cpu_features()
    print(f"\n{args.rounds} rounds x {args.reps} ops, {os.cpu_count()} CPUs, "
          f"TF {tf.__version__}; median [min-max]\nCPU: {features}")
    print(f"{'case':<24} {'GFLOP/CPU-s':>22} {'GFLOP/s wall':>22}")
    for name, v in result.items():
        print(f"{name:<24} {fmt(v['gflop_per_cpu_s'], 1):>22} {fmt(v['gflop_per_s'], 1):>22}")
    limits = {tag: best_per_cpu_second(result, tag) for tag in ("fp32", "bf16")}
    for tag, peak in limits.items():
        print(f"limit {tag}: {peak:.1f} GFLOP/CPU-s -> ResNet-50 training at 100% of it: "
              f"{peak / gflop:.2f} img/CPU-s ({gflop:.1f} GFLOP per 224 px image)")
    path = write_json("gemm_peak", {"args": vars(args), "cpu": features, "cases": result,
                                    "limit_gflop_per_cpu_s": limits,
                                    "resnet50_train_gflop_per_image": gflop}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()


def measure_limit(log=print) -> tuple[dict, dict[str, float]]:
    """(the raw result, {"fp32": GFLOP/CPU-s, "bf16": ...}): this CPU's limit measured now
    (one round), for benchmarks that give their throughput as a fraction of it."""
    result = measure(rounds=1, log=None)
    peak = {tag: best_per_cpu_second(result, tag) for tag in ("fp32", "bf16")}
    log(f"limit measured now, GFLOP/CPU-s: fp32 {peak['fp32']:.1f}, bf16 {peak['bf16']:.1f}")
    return result, peak
