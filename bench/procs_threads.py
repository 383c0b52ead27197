"""Processes vs threads on one node at the same global batch, and the Horovod settings we control.

    .venv/bin/python -m bench.procs_threads [--rounds 2] [--steps 2] [--cases 1x1,1x2,2x1,2x1_tuned]
    .venv/bin/python -m bench.procs_threads --cases all --rounds 2

ResNet-50 v1.5, 128 px, global batch 32, synthetic data, resnet_main's train step
(bench.hvd_jobs). Every case is a fresh job; the rounds run the cases in turn (interleaved),
so load from other work on the machine hits them alike. Per case: images per CPU-second of
all ranks (the robust figure on this capped VM), wall-clock images/s, CPU utilisation
(CPU seconds / (wall seconds x cores): below 1 means ranks or threads sat idle), and the
fraction of this CPU's fp32 limit (bench.gemm_peak, measured at the start of the run).
The 2018 finding to test: 2 ranks x 1 thread >= 85% of twice the 1 rank x 1 thread rate.
Writes runs/bench/procs_threads.json.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.cases import add_case_options, case_names  # noqa: E402
from bench.common import finish, fmt, summary  # noqa: E402
from bench.hvd_jobs import Job, run_rounds  # noqa: E402

# Horovod's own cycle time (1 ms) is set explicitly where a case means "Horovod's default":
# hooks.distributed.horovod_glue.init() now defaults to 10 ms when the environment sets nothing.
H1 = {"HOROVOD_CYCLE_TIME": "1"}
CASES = {
    "1x1": dict(ranks=1, intra=1),
    "1x2": dict(ranks=1, intra=2),
    "1x1_hvd": dict(ranks=1, intra=1, launcher="gloo", env=H1),  # Horovod at size 1
    "2x1": dict(ranks=2, intra=1, launcher="gloo", env=H1),  # Horovod's defaults
    "2x1_cycle10": dict(ranks=2, intra=1, launcher="gloo", env={"HOROVOD_CYCLE_TIME": "10"}),
    "2x1_cycle50": dict(ranks=2, intra=1, launcher="gloo", env={"HOROVOD_CYCLE_TIME": "50"}),
    "2x1_inter1": dict(ranks=2, intra=1, inter=1, launcher="gloo", env=H1),
    "2x1_pin": dict(ranks=2, intra=1, launcher="gloo", pin=True, env=H1),
    "2x1_overlap": dict(ranks=2, intra=1, launcher="gloo", overlap=True, env=H1),
    "2x1_tuned": dict(ranks=2, intra=1, inter=1, launcher="gloo", pin=True,
                      env={"HOROVOD_CYCLE_TIME": "50"}),
    "2x1_tuned_mpi": dict(ranks=2, intra=1, inter=1, launcher="mpi", pin=True,
                          env={"HOROVOD_CYCLE_TIME": "50"}),
    "2x2_default": dict(ranks=2, intra=0, launcher="gloo", env=H1),  # no thread flags
    "2x1_ours": dict(ranks=2, intra=1, launcher="gloo"),  # resnet_main's defaults now
    "1x1_half": dict(ranks=1, intra=1, half_batch=True),  # a 2x1 rank's batch, alone
}
DEFAULT_CASES = "1x1,1x2,2x1,2x1_ours"


def parse_args() -> tuple:
    """(args, the case names asked for)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(parser, CASES, DEFAULT_CASES, rounds=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per job")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    names = case_names(parser, args.cases, CASES)
    for name in ("rounds", "steps", "image_size", "global_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args, names


def make_jobs(names, args) -> dict:
    jobs = {}
    for n in names:
        case = dict(CASES[n])
        batch = args.global_batch // 2 if case.pop("half_batch", False) else args.global_batch
        jobs[n] = Job(**case, image_size=args.image_size, global_batch=batch, steps=args.steps)
    return jobs


def _describe(res) -> str:
    return (f"{res['images_per_cpu_sec']:6.2f} img/CPU-s {res['images_per_sec']:6.2f} img/s "
            f"wall, CPU use {res['cpu_utilisation']:.0%} (job {res['job_seconds']:.0f} s)")


def summarise(results, peak, gflop, args) -> dict:
    """Prints the table; returns its rows by case."""
    table = {}
    for name, rs in results.items():
        table[name] = {k: summary([x[k] for x in rs])
                       for k in ("images_per_cpu_sec", "images_per_sec", "cpu_utilisation")}
        table[name]["fraction_of_peak"] = (table[name]["images_per_cpu_sec"]["median"] * gflop
                                           / peak)
    print(f"\n{args.rounds} rounds x {args.steps} steps, global batch {args.global_batch}, "
          f"{args.image_size} px, {os.cpu_count()} CPUs; median [min-max]")
    print(f"{'case':<14} {'img/CPU-s':>19} {'of peak':>7} {'img/s wall':>19} {'CPU use':>17}")
    for name, t in table.items():
        print(f"{name:<14} {fmt(t['images_per_cpu_sec']):>19} {t['fraction_of_peak']:>7.0%} "
              f"{fmt(t['images_per_sec']):>19} {fmt(t['cpu_utilisation']):>17}")
    return table


def two_rank_ratios(table) -> dict:
    """Each 2x1 case against 1x1 (where both ran): per CPU-second, and wall against twice
    1x1 (the 85% target); printed a line each."""
    ratios = {}
    if "1x1" not in table:
        return ratios
    base = table["1x1"]
    for name, t in table.items():
        if name.startswith("2x1"):
            ratios[name] = {
                "per_cpu_second": t["images_per_cpu_sec"]["median"]
                / base["images_per_cpu_sec"]["median"],
                "wall_vs_twice_1x1": t["images_per_sec"]["median"]
                / (2 * base["images_per_sec"]["median"])}
            print(f"{name}: per CPU-second {ratios[name]['per_cpu_second']:.0%} of 1x1; "
                  f"wall {ratios[name]['wall_vs_twice_1x1']:.0%} of twice 1x1 "
                  f"(target 85%)")
    return ratios


def main():
    args, names = parse_args()
    from bench import gemm_peak
    from imagenet.scaling import resnet50_counts
    peak = gemm_peak.best_per_cpu_second(gemm_peak.measure(rounds=1, log=None), "fp32")
    gflop = 6 * resnet50_counts(image_size=args.image_size)["forward_macs"] / 1e9
    print(f"fp32 limit measured now: {peak:.1f} GFLOP/CPU-s; ResNet-50 at {args.image_size} px: "
          f"{gflop:.2f} GFLOP per training image", flush=True)
    jobs = make_jobs(names, args)
    results = run_rounds(jobs, args.rounds, 14, _describe)
    table = summarise(results, peak, gflop, args)
    ratios = two_rank_ratios(table)
    finish("procs_threads", {"args": vars(args), "peak_gflop_per_cpu_s": peak,
                             "gflop_per_image": gflop,
                             "cases": {n: dataclasses.asdict(j) for n, j in jobs.items()},
                             "rounds": results, "summary": table, "ratios": ratios}, args.out)


if __name__ == "__main__":
    main()
