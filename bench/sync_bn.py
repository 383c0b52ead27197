"""What synchronized batch norm (--sync_bn) costs: 2 ranks with and without it.

    .venv/bin/python -m bench.sync_bn [--rounds 2] [--steps 2] [--image_size 64]
        [--global_batch 8] [--architectures resnet,densenet121] [--cycle_time_ms 10]

2 ranks x 1 thread under horovodrun --gloo (bench.hvd_jobs: resnet_main's train step on
synthetic images), ResNet-50 (53 BN layers) and DenseNet-121 (121), small images and a small
per-rank batch, where --sync_bn is meant to be used and where its per-layer allreduces
weigh most against the compute. Each BN allreduce waits for Horovod's next cycle, forward
and backward, one layer after another: --cycle_time_ms (HOROVOD_CYCLE_TIME for every job;
default resnet_main's 10 ms) shows that floor. Rounds interleave the cases; reports images
per CPU-second (the host caps this VM's wall clock) and per wall second, median [min-max],
and the CPU model and flags. Writes runs/bench/sync_bn.json (or --out).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import fmt, lscpu, summary, write_json  # noqa: E402
from bench.hvd_jobs import Job, run_rounds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per job")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--architectures", default="resnet,densenet121")
    parser.add_argument("--cycle_time_ms", type=float, default=10.0,
                        help="HOROVOD_CYCLE_TIME of every job (resnet_main's default: 10)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    for name in ("rounds", "steps", "image_size", "global_batch", "cycle_time_ms"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    architectures = args.architectures.split(",")
    if not set(architectures) <= {"resnet", "densenet121"}:
        parser.error(f"--architectures: choose from resnet,densenet121, got {args.architectures}")
    jobs = {f"{arch}{', --sync_bn' if sync else ''}": Job(
        ranks=2, launcher="gloo", intra=1, image_size=args.image_size,
        global_batch=args.global_batch, steps=args.steps, architecture=arch, sync_bn=sync,
        env={"HOROVOD_CYCLE_TIME": str(args.cycle_time_ms)})
        for arch in architectures for sync in (False, True)}
    results = run_rounds(jobs, args.rounds, 24,
                         lambda res: f"{res['images_per_cpu_sec']:6.3f} img/CPU-s "
                                     f"{res['images_per_sec']:6.3f} img/s wall")
    cpu = lscpu()
    print(f"\n{cpu.get('model', '?')}; flags: {cpu.get('flags', '?')}")
    print(f"2 ranks x 1 thread (gloo), cycle {args.cycle_time_ms:g} ms, {args.rounds} rounds "
          f"x {args.steps} steps, global batch {args.global_batch}, {args.image_size} px; "
          "median [min-max]")
    print(f"{'case':<24} {'img/CPU-s':>20} {'img/s wall':>20} {'vs without':>10}")
    table = {}
    for name, rs in results.items():
        table[name] = {k: summary([x[k] for x in rs])
                       for k in ("images_per_cpu_sec", "images_per_sec")}
        base = table[name.replace(", --sync_bn", "")]["images_per_cpu_sec"]["median"]
        ratio = table[name]["images_per_cpu_sec"]["median"] / base
        print(f"{name:<24} {fmt(table[name]['images_per_cpu_sec'], 3):>20} "
              f"{fmt(table[name]['images_per_sec'], 3):>20} {ratio:>10.3f}")
    path = write_json("sync_bn", {"args": vars(args), "cpu": cpu, "rounds": results,
                                  "summary": table}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
