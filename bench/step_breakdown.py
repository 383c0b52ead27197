"""Where a training step spends its time: TF profiler op times by kind, ResNet-50 and DenseNet-121.

    .venv/bin/python -m bench.step_breakdown [--cases resnet50,densenet121] [--batch 8]

One process, 1 rank (Horovod not started: `allreduce_gradients` returns the gradients as
they are at size 1, no grouped-allreduce copy), synthetic 224 px images, the training steps
our entry points run: resnet_main's ResNet-50 (`bench.resnet_throughput.ours`:
DistributedTrainer, sparse softmax cross-entropy, SGD momentum, L2 weight decay) and
chexnet's DenseNet-121 (`bench.chexnet_backbones.build`: 14-way sigmoid head, weighted BCE,
SGD momentum), with today's defaults: fused batch norm and the one-kernel SGD update
(`hooks.practices.fused_optimizers`). The `*_before` cases are the same steps as they ran before:
Keras's SGD update (separate element-wise ops) and, for DenseNet, Keras's
BatchNormalization. Per case: one warm-up step, `--steps` timed steps (images per
CPU-second and per wall second), then `--steps` steps under the TF profiler, whose op events
(executor threads of the host plane; oneDNN's own threads run inside those ops) are summed
by kind: convolution forward / backward-input / backward-filter, GEMM, batch norm,
element-wise, casts, transposes, concat/slice/pad, pooling, the optimizer update, loss and
metrics (by name scope), other. Op times are the wall time of each op while it ran (two
executor threads may overlap), so the shares, not the sums, are what to read. Writes
runs/bench/step_breakdown.json.
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import Clock, lscpu, write_json  # noqa: E402

# Today's defaults, and before (Keras's SGD update; for DenseNet also Keras's batch norm).
CASES = ("resnet50", "resnet50_before", "densenet121", "densenet121_before")
# Op type -> kind (oneDNN's rewritten names start with _MklNative / _Mkl / _Fused).
KINDS = [
    ("conv backward-filter", r"Conv2DBackpropFilter"),
    ("conv backward-input", r"Conv2DBackpropInput"),
    ("conv forward", r"Conv2D|DepthwiseConv"),
    ("GEMM", r"MatMul"),
    ("batch norm (fused kernel)", r"FusedBatchNorm"),
    ("cast", r"^Cast$|_MklCast"),
    ("transpose", r"Transpose"),
    ("concat/slice/pad", r"Concat|Slice|^Pad|Split|Pack|Tile|Gather"),
    ("pooling", r"Pool|^Mean$"),
    ("optimizer update", r"^ResourceApply|Assign(Add|Sub)?VariableOp"),
]
# Name scopes that decide the kind first (whatever the op type).
SCOPES = [
    ("loss and metrics", r"loss|crossentropy|metric|top_1|accuracy|auc"),
    ("optimizer update", r"(^|/)(SGD|sgd|adam|Adam|optimizer)(_\d+)?/"),
    ("batch norm (Keras ops)", r"(_bn\d?|batch_normalization[^/]*|/bn)(_\d+)?/"),
]
OP_EVENT = re.compile(r"^([\w./\-]+):([A-Z_]\w*)$")  # 'scope/name:OpType'
NOT_WORK = re.compile(r"^(ReadVariableOp|Identity|NoOp|Const|_Arg|_Retval|VarHandleOp|"
                      r"Placeholder|IteratorGetNext|.*Iterator.*|Shape|Reshape|"
                      r"ExpandDims|Squeeze)$")


def kind_of(name: str, op_type: str) -> str | None:
    """The breakdown row of one op event ('scope/.../op:Type'); None for bookkeeping ops
    (variable reads, identities, shapes) that do no arithmetic."""
    if NOT_WORK.match(op_type):
        return None
    if "FusedBatchNorm" not in op_type:  # a fused BN kernel is BN, whatever its scope
        for kind, pattern in SCOPES:
            if re.search(pattern, name):
                return kind
    for kind, pattern in KINDS:
        if re.search(pattern, op_type):
            return kind
    return "element-wise and other"


def op_times(logdir: str) -> tuple[dict, dict]:
    """Seconds of op events by kind, and of the 25 longest (kind | op type) rows, from the
    newest xplane.pb under `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    types = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        meta = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                match = OP_EVENT.match(meta[event.metadata_id].name)
                if not match:  # executor, function and runtime events, not ops
                    continue
                scope, op_type = match.groups()
                kind = kind_of(scope, op_type)
                if kind:
                    totals[kind] += event.duration_ps * 1e-12
                    types[f"{kind} | {op_type}"] += event.duration_ps * 1e-12
    return dict(totals), dict(types.most_common(25))


def build(case: str, batch: int, image_size: int):
    """(trainer, dataset) of one case."""
    import tensorflow as tf

    now = not case.endswith("_before")
    if case.startswith("resnet50"):
        from bench.resnet_throughput import _data, ours

        return ours("float32", fused_optimizer=now), _data(batch, image_size, tf.float32)
    from bench.chexnet_backbones import build as chexnet_build

    trainer, data, _ = chexnet_build("densenet121", "float32", now, batch, image_size,
                                     fused_optimizer=now)
    return trainer, data


def measure(case: str, batch: int, steps: int, image_size: int) -> dict:
    import tensorflow as tf

    trainer, data = build(case, batch, image_size)
    run = lambda: trainer.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)  # noqa: E731
    trainer.fit(data, steps_per_epoch=1, epochs=1, verbose=0)  # trace + first step
    with Clock() as clock:
        run()
    logdir = tempfile.mkdtemp(prefix="step_breakdown-")
    tf.profiler.experimental.start(logdir)
    run()
    tf.profiler.experimental.stop()
    totals, top_types = op_times(logdir)
    images = batch * steps
    return {"images_per_cpu_s": images / clock.cpu, "images_per_wall_s": images / clock.wall,
            "cpu_s_per_step": clock.cpu / steps, "wall_s_per_step": clock.wall / steps,
            "op_seconds": totals, "top_op_types": top_types, "logdir": logdir}


def table(results: dict) -> str:
    kinds = sorted({k for r in results.values() for k in r["op_seconds"]},
                   key=lambda k: -max(r["op_seconds"].get(k, 0) for r in results.values()))
    lines = ["| kind | " + " | ".join(results) + " |",
             "|---|" + "---:|" * len(results)]
    for kind in kinds:
        cells = []
        for r in results.values():
            total = sum(r["op_seconds"].values())
            cells.append(f"{100 * r['op_seconds'].get(kind, 0) / total:.1f} %")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| img / CPU-s (wall img/s) | " + " | ".join(
        f"{r['images_per_cpu_s']:.2f} ({r['images_per_wall_s']:.2f})"
        for r in results.values()) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=", ".join(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed and profiled steps")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or args.batch < 1 or args.steps < 1:
        parser.error(f"--cases must be among {', '.join(CASES)}, --batch and --steps >= 1")
    results = {}
    for case in cases:
        results[case] = measure(case, args.batch, args.steps, args.image_size)
        print(f"{case}: {results[case]['images_per_cpu_s']:.2f} img/CPU-s, "
              f"{results[case]['images_per_wall_s']:.2f} img/s wall", flush=True)
        for name, sec in results[case]["top_op_types"].items():
            print(f"    {sec:8.3f} s  {name}")
    print(table(results))
    cpu = lscpu()
    print(f"CPU: {cpu.get('model')} ({cpu.get('cpus')} CPUs)")
    path = write_json("step_breakdown", {"args": vars(args), "lscpu": cpu,
                                         "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
