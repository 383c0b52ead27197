"""Submit one of the slurm/*.sbatch scripts for N nodes without copy-editing it.

    python -m slurm.submit --nodes 256 imagenet_resnet50 --set BATCH=8192 \\
        --set DATA_DIR=/scratch/imagenet --set MODEL_DIR=/scratch/$USER/rn50-8k
    python -m slurm.submit --nodes 16 --partition cpu --account proj chexnet_finetune --dry-run

It only builds the sbatch command line: --nodes, --ntasks-per-node (default 2, one rank per
socket), --cpus-per-task (default: the partition's CPUs per node / tasks per node, from
`sinfo`), --partition/--account/--time when given, and the script's variables as
environment (sbatch exports them to the job). --dry-run prints the command instead of
running it; the printed line is what to put in a site's own submission notes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent
SCRIPTS = sorted(p.stem for p in SLURM_DIR.glob("*.sbatch"))


def node_cpus(partition: str | None) -> int | None:
    """Smallest CPU count of the partition's nodes (None when sinfo is unavailable)."""
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(tok.rstrip("+")) for tok in out.split() if tok.rstrip("+").isdigit()]
    return min(counts) if counts else None


def build(args) -> tuple[list[str], dict[str, str]]:
    script = SLURM_DIR / f"{args.script}.sbatch"
    cmd = ["sbatch", f"--nodes={args.nodes}", f"--ntasks-per-node={args.tasks_per_node}"]
    cpus = args.cpus_per_task
    if cpus is None:
        total = node_cpus(args.partition)
        cpus = max(1, total // args.tasks_per_node) if total else None
    if cpus:
        cmd.append(f"--cpus-per-task={cpus}")
    for opt in ("partition", "account", "time", "job_name"):
        value = getattr(args, opt)
        if value:
            cmd.append(f"--{opt.replace('_', '-')}={value}")
    cmd += args.sbatch_arg + [str(script)]
    env = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--set expects VAR=VALUE, got {item!r}")
        env[key] = value
    return cmd, env


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", choices=SCRIPTS, help="which slurm/<script>.sbatch")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=2,
                   help="ranks per node (2 = one per socket)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="default: the partition's CPUs per node / tasks per node (sinfo)")
    p.add_argument("--partition", default=os.environ.get("PARTITION"))
    p.add_argument("--account", default=os.environ.get("ACCOUNT"))
    p.add_argument("--time", default=None, help="wall-time limit, e.g. 02:30:00")
    p.add_argument("--job-name", default=None)
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                   help="a variable of the batch script (BATCH, DATA_DIR, MODEL_DIR, ...)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, e.g. --sbatch-arg=--qos=high")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not submit")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.tasks_per_node < 1:
        p.error("--nodes and --tasks-per-node must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cmd, env = build(args)
    line = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                     *map(shlex.quote, cmd)])
    print(line)
    if args.dry_run:
        return 0
    return subprocess.run(cmd, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
