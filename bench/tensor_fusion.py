"""Tensor fusion seen in the Horovod timeline, Gloo and MPI; and Horovod's cost at one rank.

    .venv/bin/python -m bench.tensor_fusion [--rounds 2] [--steps 2] [--launchers gloo,mpi]

2 ranks x 1 thread, ResNet-50 v1.5 at 128 px, global batch 32 (bench.hvd_jobs), with
HOROVOD_FUSION_THRESHOLD 0 (fusion off), 64 MiB (Horovod's default in 2018) and 128 MiB
(today's default), under horovodrun --gloo and mpirun. Rank 0 records a Horovod timeline of
the timed steps only (HOROVOD_TIMELINE=DYNAMIC); per step it gives the allreduce calls
(collective operations actually run: the overlapping activities of fused tensors count
once), the tensors reduced, and the seconds spent in the collective (GLOO_/MPI_ALLREDUCE),
in fusion-buffer copies and in negotiation (which includes waiting for the other rank).
Cycle time: resnet_main's default (10 ms) unless --cycle_time_ms. Also 1 rank with no launcher vs
1 rank under horovodrun / mpirun (Horovod initialised, size 1: its background thread only).
Rounds interleave the cases. Writes runs/bench/tensor_fusion.json.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import finish, fmt, summary  # noqa: E402
from bench.hvd_jobs import Job, run_rounds  # noqa: E402

COLLECTIVES = ("GLOO_ALLREDUCE", "MPI_ALLREDUCE")
FUSIONS_MIB = (0, 64, 128)


def load_events(path: str) -> list:
    """The timeline's events (Horovod leaves the JSON array unterminated)."""
    with open(path) as f:
        text = f.read().strip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def spans(events: list) -> list[tuple[str, str, float, float]]:
    """(tensor, activity, start us, end us) of every B/E pair (nested per tensor) and X event."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and "name" in e.get("args", {})}
    stacks: dict[int, list] = {}
    out = []
    for e in events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "B":
            stacks.setdefault(pid, []).append((e.get("name", ""), float(e["ts"])))
        elif ph == "E" and stacks.get(pid):
            name, start = stacks[pid].pop()
            out.append((names.get(pid, str(pid)), name, start, float(e["ts"])))
        elif ph == "X":
            out.append((names.get(pid, str(pid)), e.get("name", ""), float(e["ts"]),
                        float(e["ts"]) + float(e.get("dur", 0))))
    return out


def merge(intervals) -> list:
    """Overlapping (start, end) intervals merged: fused tensors' activities overlap (Horovod
    stamps each tensor of a fused buffer a few microseconds apart), separate calls do not."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def union_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals given in microseconds, in seconds."""
    return sum(b - a for a, b in merge(intervals)) / 1e6


def timeline_stats(path: str, steps: int) -> dict:
    """Per step: collective calls, tensors reduced, collective/memcpy/negotiation seconds."""
    sp = spans(load_events(path))
    coll = [(a, b) for _, name, a, b in sp if name in COLLECTIVES]
    return {
        "allreduce_calls": len(merge(coll)) / steps,
        "tensors": len({t for t, name, _, _ in sp if name in COLLECTIVES}),
        "collective_s": union_seconds(coll) / steps,
        "memcpy_s": union_seconds([(a, b) for _, n, a, b in sp if n.startswith("MEMCPY")]) / steps,
        "negotiate_s": union_seconds([(a, b) for _, n, a, b in sp
                                      if n.startswith("NEGOTIATE")]) / steps,
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per job")
    parser.add_argument("--launchers", default="gloo,mpi")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--cycle_time_ms", type=float, default=None,
                        help="HOROVOD_CYCLE_TIME for every job (default: Horovod's)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    if not set(args.launchers.split(",")) <= {"gloo", "mpi"}:
        parser.error(f"--launchers: choose from gloo,mpi, got {args.launchers}")
    for name in ("rounds", "steps", "image_size", "global_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def make_jobs(args, tmp) -> dict:
    """name: Job of each case; the 2-rank jobs write their Horovod timeline under `tmp`."""
    common = dict(image_size=args.image_size, global_batch=args.global_batch, steps=args.steps,
                  intra=1)
    cycle = {} if args.cycle_time_ms is None else {"HOROVOD_CYCLE_TIME": str(args.cycle_time_ms)}
    launchers = args.launchers.split(",")
    jobs = {"1 rank, no launcher": Job(**common)}
    for launcher in launchers:
        jobs[f"1 rank, {launcher}"] = Job(**common, launcher=launcher, env=dict(cycle))
    for launcher in launchers:
        for mib in FUSIONS_MIB:
            env = dict(cycle, HOROVOD_FUSION_THRESHOLD=str(mib * 1024 * 1024))
            name = f"2 ranks, {launcher}, fusion {mib} MiB" if mib else \
                f"2 ranks, {launcher}, fusion off"
            jobs[name] = Job(**common, ranks=2, launcher=launcher, env=env,
                             timeline=os.path.join(tmp, f"{launcher}-{mib}.json"))
    return jobs


def _add_timeline(job, res) -> None:
    if job.timeline:
        res["timeline"] = timeline_stats(job.timeline, job.steps)


def _describe(res) -> str:
    extra = (" {allreduce_calls:.1f} allreduce/step, collective {collective_s:.3f} s/step"
             .format(**res["timeline"]) if "timeline" in res else "")
    return (f"{res['images_per_cpu_sec']:6.2f} img/CPU-s "
            f"{res['images_per_sec']:6.2f} img/s wall{extra}")


def summarise(results, args) -> dict:
    """Prints the table; returns its rows by case."""
    table = {}
    print(f"\n{args.rounds} rounds x {args.steps} steps, global batch {args.global_batch}, "
          f"{args.image_size} px, 1 thread per rank; median [min-max]")
    print(f"{'case':<28} {'img/CPU-s':>18} {'img/s wall':>18} {'calls':>5} {'tensors':>7} "
          f"{'collective s':>12} {'memcpy s':>8} {'negotiate s':>11}")
    for name, rs in results.items():
        row = {k: summary([x[k] for x in rs]) for k in ("images_per_cpu_sec", "images_per_sec")}
        tl = ""
        if "timeline" in rs[0]:
            row["timeline"] = {k: summary([x["timeline"][k] for x in rs])
                               for k in rs[0]["timeline"]}
            t = {k: v["median"] for k, v in row["timeline"].items()}
            tl = (f"{t['allreduce_calls']:>5.1f} {t['tensors']:>7.0f} {t['collective_s']:>12.3f} "
                  f"{t['memcpy_s']:>8.3f} {t['negotiate_s']:>11.3f}")
        table[name] = row
        print(f"{name:<28} {fmt(row['images_per_cpu_sec']):>18} {fmt(row['images_per_sec']):>18} "
              f"{tl}")
    return table


def main():
    args = parse_args()
    jobs = make_jobs(args, tempfile.mkdtemp(prefix="timeline-"))
    results = run_rounds(jobs, args.rounds, 28, _describe, add=_add_timeline)
    table = summarise(results, args)
    finish("tensor_fusion", {"args": vars(args), "rounds": results, "summary": table}, args.out)


if __name__ == "__main__":
    main()
