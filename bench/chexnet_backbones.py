"""CheXNet backbones' training step, fp32 vs bf16, and Keras's batch norm vs our fused one.

    .venv/bin/python -m bench.chexnet_backbones [--backbones densenet121] [--steps 2] [--rounds 5]
    .venv/bin/python -m bench.chexnet_backbones --precisions fp32 --batch 16   # BN only

One process, 1 rank, synthetic 224 px images and 14 random labels, batch 16, the training
step chexnet runs (chexnet.model's backbone + 14-way sigmoid head, hooks.distributed.horovod_glue's
DistributedTrainer, weighted BCE of chexnet.train, SGD momentum). Per backbone: float32 and
mixed_bfloat16, each with Keras's BatchNormalization (what keras.applications builds) and
with imagenet.models.FusedBatchNormalization swapped in (`models.fuse_batch_norms`; ResNet
has it already, VGG16 has no batch norm). Cases interleaved in every round; images per
CPU-second (the robust figure on this capped VM), wall-clock beside it, median [min-max];
bf16 / fp32 and fused / Keras BN ratios of the medians; the fraction of this CPU's limit
(bench.gemm_peak, measured at the start) at 3 x 2 x the forward multiply-adds counted layer
by layer (bench.common.forward_macs: DenseNet-121 2.83 G at 224 px, as torchvision's table).
Writes runs/bench/chexnet_backbones.json.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import (  # noqa: E402
    Clock,
    finish,
    fmt,
    forward_macs,
    fraction_of_limit,
    print_round,
    summary,
)

BACKBONES = ("densenet121", "resnet50", "vgg16", "vgg16_pooled")


def build(backbone: str, policy: str, fused_bn: bool, batch: int, image_size: int,
          fused_optimizer: bool = True):
    """(trainer, dataset, forward multiply-adds per image) for one case."""
    import keras
    import tensorflow as tf

    from chexnet import model as model_lib
    from chexnet.labels import NUM_CLASSES
    from chexnet.train import make_loss
    from hooks.distributed import horovod_glue
    from hooks.practices import fused_optimizers
    from imagenet import models

    keras.mixed_precision.set_global_policy(policy)
    arch, depth = model_lib.parse_backbone(backbone)
    base = models.build_backbone(arch, image_size, depth or 50, fused_bn=fused_bn)
    network = model_lib._attach_head(base.input, base.output, f"chexnet_{backbone}")
    trainer = horovod_glue.DistributedTrainer(network, horovod_glue.Context())
    sgd = fused_optimizers.SGD if fused_optimizer else keras.optimizers.SGD  # as chexnet
    trainer.compile(optimizer=sgd(0.01, momentum=0.9),
                    loss=make_loss(None, None), jit_compile=False)
    dtype = tf.bfloat16 if "bfloat16" in policy else tf.float32

    def make(_):
        x = tf.random.stateless_truncated_normal([batch, image_size, image_size, 3], [0, 0])
        y = tf.cast(tf.random.stateless_uniform([batch, NUM_CLASSES], [0, 1]) < 0.2, tf.float32)
        return tf.cast(x, dtype), y

    data = tf.data.Dataset.range(1).map(make).cache().repeat()
    return trainer, data, forward_macs(network)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="densenet121",
                        help=f"comma-separated: {', '.join(BACKBONES)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 or both")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    for name in ("steps", "rounds", "batch", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    precisions = args.precisions.split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        parser.error("--precisions: fp32, bf16 or fp32,bf16")
    if any(b not in BACKBONES for b in args.backbones.split(",")):
        parser.error(f"--backbones: choose from {', '.join(BACKBONES)}")
    return args


def build_cases(args) -> dict:
    """name: (precision, policy, (trainer, data, multiply-adds per image)) of each case."""
    precisions = args.precisions.split(",")
    cases = {}
    for backbone in args.backbones.split(","):
        # ResNet is built with the fused batch norm; VGG16 has none: one variant each.
        variants = ((False, True) if backbone == "densenet121" else
                    ((True,) if backbone == "resnet50" else (False,)))
        for fused in variants:
            for precision, policy in (("fp32", "float32"), ("bf16", "mixed_bfloat16")):
                if precision not in precisions:
                    continue
                name = f"{backbone}_{'fusedbn' if fused else 'kerasbn'}_{precision}"
                if backbone.startswith("vgg16"):
                    name = f"{backbone}_{precision}"
                cases[name] = (precision, policy,
                               build(backbone, policy, fused, args.batch, args.image_size))
                print(f"built {name}", flush=True)
    return cases


def run_rounds(cases, args):
    """Interleaved rounds: ({name: [img/CPU-s]}, {name: [img/s wall]})."""
    import keras

    per_cpu = {name: [] for name in cases}
    wall = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, (_, policy, (trainer, data, _)) in cases.items():
            keras.mixed_precision.set_global_policy(policy)
            if r == 0:  # tracing; Keras keeps the traced step for later fit calls
                trainer.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
            with Clock() as c:
                trainer.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
            per_cpu[name].append(args.steps * args.batch / c.cpu)
            wall[name].append(args.steps * args.batch / c.wall)
            print_round(r, name, 28, wall[name][-1], per_cpu[name][-1])
    return per_cpu, wall


def _ratio(per_cpu, name, other, applies) -> float:
    """Median img/CPU-s of `name` over that of `other`, None where it does not apply."""
    if not (applies and other in per_cpu):
        return None
    return summary(per_cpu[name])["median"] / summary(per_cpu[other])["median"]


def summarise(cases, per_cpu, wall, peak, args) -> dict:
    """Prints the table; returns its rows by case."""
    result = {}
    print(f"\n{args.rounds} interleaved rounds x {args.steps} steps, batch {args.batch}, "
          f"{args.image_size} px, 1 process, {os.cpu_count()} CPUs; median [min-max]")
    print(f"{'case':<28} {'img/CPU-s':>20} {'img/s wall':>20} {'bf16/fp32':>9} "
          f"{'fused/keras BN':>14} {'GFLOP/CPU-s':>11} {'of limit':>8}")
    for name, (precision, _, (_, _, macs)) in cases.items():
        s_cpu, s_wall = summary(per_cpu[name]), summary(wall[name])
        flop = 3 * 2 * macs
        vs_fp32 = _ratio(per_cpu, name, name.replace("_bf16", "_fp32"), precision == "bf16")
        vs_keras_bn = _ratio(per_cpu, name, name.replace("fusedbn", "kerasbn"),
                             "fusedbn" in name)
        of_limit = fraction_of_limit(s_cpu["median"], flop, peak[precision])
        result[name] = {"img_per_cpu_s": s_cpu, "img_per_s": s_wall,
                        "train_flop_per_image": flop, "bf16_over_fp32": vs_fp32,
                        "fused_over_keras_bn": vs_keras_bn, "fraction_of_limit": of_limit}
        print(f"{name:<28} {fmt(s_cpu):>20} {fmt(s_wall):>20} "
              f"{f'{vs_fp32:.2f}x' if vs_fp32 else '-':>9} "
              f"{f'{vs_keras_bn:.2f}x' if vs_keras_bn else '-':>14} "
              f"{s_cpu['median'] * flop / 1e9:11.1f} {of_limit:8.0%}")
    return result


def main():
    args = parse_args()
    from bench import gemm_peak
    _, peak = gemm_peak.measure_limit(log=lambda line: print(line, flush=True))
    cases = build_cases(args)
    per_cpu, wall = run_rounds(cases, args)
    result = summarise(cases, per_cpu, wall, peak, args)
    finish("chexnet_backbones", {"args": vars(args), "limit_gflop_per_cpu_s": peak,
                                 "cases": result}, args.out)


if __name__ == "__main__":
    main()
