"""Training and evaluation throughput of resnet_main's ResNet-50 against plain Keras, side by side.

One process, 1 rank, synthetic 224 px images, batch 32: plain
`keras.applications.ResNet50` + `model.fit`, then our ResNet-50 v1.5 through the same
DistributedTrainer that resnet_main uses, in float32 and bfloat16 (and bfloat16 with
Keras's BatchNormalization instead of our fused one, to show what that buys), and
evaluation as resnet_main runs it (hooks.training.evaluation.evaluate: forward pass with
training=False plus the top-1/top-5/loss metrics) in float32 and bfloat16. The
measurements are interleaved in rounds so that noise from other work on the machine hits
all of them alike; the ratios are what to read. Images per CPU-second (the robust figure on
this capped VM) with wall-clock beside it, median [min-max] over the rounds. Each case is
also given as a fraction of this CPU's limit (bench.gemm_peak, measured at the start of the
run: best GEMM/convolution GFLOP per CPU-second of the case's precision) at 24.5 GFLOP per
224 px training image and 8.18 per forward pass (imagenet.scaling: 4.09 G multiply-adds
counted layer by layer, as torchvision's table; training = 3x forward). Writes
runs/bench/resnet_throughput.json and a `BENCH {json}` line.

  .venv/bin/python -m bench.resnet_throughput [--steps 4] [--rounds 5] [--cases a,b]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import Clock, finish, fmt, fraction_of_limit, print_round, summary  # noqa: E402
from hooks import runtime
from hooks.distributed import horovod_glue
from hooks.practices import fused_optimizers  # noqa: E402
from imagenet import input_pipeline, models  # noqa: E402
from imagenet.scaling import (  # noqa: E402
    RESNET50_FORWARD_FLOP_PER_IMAGE,
    RESNET50_TRAIN_FLOP_PER_IMAGE,
)

# name: (train | eval, precision, variant). Eval cases run resnet_main's evaluation step on
# the network of the training case of the same precision.
CASES = {"keras_fp32": ("train", "fp32", "keras"),
         "ours_fp32": ("train", "fp32", "fused"),
         "ours_bf16": ("train", "bf16", "fused"),
         "ours_bf16_kerasbn": ("train", "bf16", "kerasbn"),
         "ours_eval_fp32": ("eval", "fp32", "fused"),
         "ours_eval_bf16": ("eval", "bf16", "fused")}


def _data(batch, image_size, dtype):
    return input_pipeline.synthetic_dataset(per_rank_batch=batch, image_size=image_size,
                                            num_classes=1000, dtype=dtype)


def plain_keras(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = keras.applications.ResNet50(weights=None, classes=1000)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    return model


def ours(policy, fused_bn=True, fused_optimizer=True):
    keras.mixed_precision.set_global_policy(policy)
    # fused_bn=False: the same network with Keras's own BatchNormalization, for comparison
    net = models.build_classifier("resnet", 1000, 224, depth=50, weight_decay=1e-4,
                                  fused_bn=fused_bn)
    trainer = horovod_glue.DistributedTrainer(net, horovod_glue.Context())
    sgd = fused_optimizers.SGD if fused_optimizer else keras.optimizers.SGD  # as resnet_main
    trainer.compile(optimizer=sgd(0.1, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    return trainer


def measure(model, data, steps, warm_up):
    """(wall seconds, CPU seconds of this process) per step over `steps` steps of `fit`,
    after one warm-up fit call (tracing; Keras keeps the traced function, so only the first
    round needs it). CPU time does not grow while the host holds the VM back."""
    if warm_up:
        model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
    with Clock() as c:
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return c.wall / steps, c.cpu / steps


def measure_eval(network, data, steps, warm_up):
    """The same for evaluation as resnet_main runs it (hooks.training.evaluation.evaluate: the
    network's forward pass with training=False and top-1/top-5/loss metric updates, one
    traced step per batch), over `steps` batches."""
    from hooks.training import evaluation
    from imagenet.train import eval_metrics
    metrics = _EVAL_METRICS.setdefault(id(network), eval_metrics(1000))
    context = horovod_glue.Context()
    if warm_up:
        evaluation.evaluate(network, data.take(1), metrics, context)
    with Clock() as c:
        _, count = evaluation.evaluate(network, data.take(steps), metrics, context)
    assert count == steps * int(data.element_spec[1].shape[0]), count
    return c.wall / steps, c.cpu / steps


_EVAL_METRICS = {}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--eval_steps", type=int, default=0,
                        help="timed evaluation batches per round (0: 3 x --steps, about "
                             "the same time as a training case)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated subset of {', '.join(CASES)} (default: all; "
                             "without bf16 instructions in the CPU, all but bf16 training, "
                             "which takes hours there)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    for name in ("steps", "rounds", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.cases is None:
        slow = () if runtime.native_bf16() else ("ours_bf16", "ours_bf16_kerasbn")
        if slow:
            print(f"no bf16 instructions in this CPU: leaving out {', '.join(slow)} "
                  "(ask for them with --cases)", flush=True)
        args.cases = ",".join(n for n in CASES if n not in slow)
    unknown = [n for n in args.cases.split(",") if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    return args


def build_cases(names, batch) -> dict:
    """name: (model or network, data, policy) of each case."""
    built = {}
    for name in names:
        kind, precision, variant = CASES[name]
        policy = "float32" if precision == "fp32" else "mixed_bfloat16"
        dtype = tf.float32 if precision == "fp32" else tf.bfloat16
        if kind == "eval":  # the training case's network when it is built, else a new one
            train_case = f"ours_{precision}"
            network = (built[train_case][0].network if train_case in built
                       else ours(policy).network)
            built[name] = (network, _data(batch, 224, dtype), policy)
        else:
            model = plain_keras(policy) if variant == "keras" else ours(
                policy, fused_bn=variant != "kerasbn")
            built[name] = (model, _data(batch, 224, dtype), policy)
    return built


def run_rounds(built, args, eval_steps):
    """Interleaved rounds: ({name: [img/s wall]}, {name: [img/CPU-s]})."""
    wall = {name: [] for name in built}
    cpu = {name: [] for name in built}
    for r in range(args.rounds):
        for name, (model, data, policy) in built.items():
            keras.mixed_precision.set_global_policy(policy)
            if CASES[name][0] == "eval":
                sec, cpu_sec = measure_eval(model, data, eval_steps, warm_up=r == 0)
            else:
                sec, cpu_sec = measure(model, data, args.steps, warm_up=r == 0)
            wall[name].append(args.batch / sec)
            cpu[name].append(args.batch / cpu_sec)
            print_round(r, name, 17, wall[name][-1], cpu[name][-1])
    return wall, cpu


def summarise(names, wall, cpu, peak, args, eval_steps) -> dict:
    """Prints the table; returns its rows by case."""
    result = {}
    ref = "keras_fp32" if "keras_fp32" in names else None
    print(f"\n{args.rounds} interleaved rounds x {args.steps} training steps / {eval_steps} "
          f"evaluation batches, batch {args.batch}, 224 px, 1 process, {os.cpu_count()} CPUs; "
          f"median [min-max]; GFLOP per image: training {RESNET50_TRAIN_FLOP_PER_IMAGE / 1e9:.1f}, "
          f"evaluation (forward) {RESNET50_FORWARD_FLOP_PER_IMAGE / 1e9:.2f}")
    print(f"{'case':<17} {'img/CPU-s':>20} {'x keras_fp32':>12} {'img/s wall':>20} "
          f"{'GFLOP/CPU-s':>11} {'of limit':>8}")
    for name in names:
        kind, precision, _ = CASES[name]
        s_cpu, s_wall = summary(cpu[name]), summary(wall[name])
        flop = RESNET50_FORWARD_FLOP_PER_IMAGE if kind == "eval" else RESNET50_TRAIN_FLOP_PER_IMAGE
        of_limit = fraction_of_limit(s_cpu["median"], flop, peak[precision])
        vs_ref = (s_cpu["median"] / statistics.median(cpu[ref])
                  if ref and kind == "train" else None)
        result[name] = {"img_per_cpu_s": s_cpu, "img_per_s": s_wall, "flop_per_image": flop,
                        "gflop_per_cpu_s": s_cpu["median"] * flop / 1e9,
                        "fraction_of_limit": of_limit, "x_keras_fp32": vs_ref}
        print(f"{name:<17} {fmt(s_cpu):>20} {f'{vs_ref:.2f}x' if vs_ref else '-':>12} "
              f"{fmt(s_wall):>20} {s_cpu['median'] * flop / 1e9:11.1f} {of_limit:8.0%}")
    return result


def main():
    args = parse_args()
    names = args.cases.split(",")
    eval_steps = args.eval_steps or 3 * args.steps
    from bench import gemm_peak
    peak_result, peak = gemm_peak.measure_limit(log=lambda line: print(line, flush=True))
    wall, cpu = run_rounds(build_cases(names, args.batch), args, eval_steps)
    result = summarise(names, wall, cpu, peak, args, eval_steps)
    finish("resnet_throughput", {"args": vars(args), "eval_steps": eval_steps,
                                 "limit_gflop_per_cpu_s": peak, "limit_cases": peak_result,
                                 "cases": result}, args.out,
           bench={k: {"per_cpu_second": v["img_per_cpu_s"]["median"],
                      "wall_median": v["img_per_s"]["median"],
                      "fraction_of_limit": v["fraction_of_limit"]} for k, v in result.items()})


if __name__ == "__main__":
    main()
