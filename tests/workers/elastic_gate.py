"""Runs resnet_main.py or `-m chexnet ...` with a gate after one training step, for the
elastic tests under horovodrun: the world changes where the test says, however slow the
machine, instead of racing the end of the run.

Usage: python -m tests.workers.elastic_gate GATE_DIR SIZE STEP (script.py | -m module) ARGS

After global step STEP (or the first step after it) in a world of SIZE ranks, each rank
creates GATE_DIR/waiting-<rank> and waits until GATE_DIR/go exists; the test makes the change
(kills a rank, or adds a host and waits until Horovod's driver has told rank 0 about it)
and then creates `go`. The next collective fails on the dead peer, or the next commit
raises Horovod's HostsUpdatedInterrupt. The gate opens once; nothing else changes.
"""
import os
import runpy
import sys
import time

WAIT_S = 600  # generous: the test acts within seconds of seeing every rank wait


def _wait_at_gate(gate_dir, rank):
    from hooks.distributed import watchdog

    open(os.path.join(gate_dir, f"waiting-{rank}"), "w").close()
    go, deadline = os.path.join(gate_dir, "go"), time.monotonic() + WAIT_S
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise RuntimeError(f"elastic_gate: no {go} within {WAIT_S} s")
        watchdog.beat()  # the test's wait is no stall
        time.sleep(0.05)


def install(gate_dir, size, step):
    """Wrap ElasticRun.first_step_done (called after every step) with the gate. Done from
    inside run_entry: hooks.distributed.elastic imports TensorFlow, which must come after the entry
    point's own start-up."""
    from hooks.distributed import elastic

    after_step, opened = elastic.ElasticRun.first_step_done, []

    def gated(self):
        context = self.trainer.context
        if not opened and context.size == size and self.state.step >= step:
            opened.append(True)
            _wait_at_gate(gate_dir, context.rank)
        after_step(self)

    elastic.ElasticRun.first_step_done = gated


def main(argv):
    gate_dir, size, step, *program = argv
    from hooks import entry

    run_entry = entry.run_entry

    def gated_run_entry(prog, perf, dist, config, validate, run):
        def run_gated(config, context):
            install(gate_dir, int(size), int(step))
            return run(config, context)
        return run_entry(prog, perf, dist, config, validate, run_gated)

    entry.run_entry = gated_run_entry
    if program[0] == "-m":
        sys.argv = program[1:]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
