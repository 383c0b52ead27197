"""Shared training machinery, in sub-packages that say what they hold:

- `hooks.training`: the runner, the one training loop, its callbacks, evaluation, steps;
- `hooks.distributed`: Horovod glue, elastic training, the stall watchdog;
- `hooks.state`: checkpoints, faults (divergence, preemption), data order, run records,
  safe file handling;
- `hooks.practices`: LR schedules and recipes, LARS, weight decay, snapshots, time to
  accuracy, fused optimizers.

At the top level is the program's edge: `entry` (what every command-line entry point does),
`errors`, `settings`, `runtime`, and the commands `python -m hooks.stderr_filter` and
`python -m hooks.plot_schedule`.

Submodules are imported explicitly (``from hooks.distributed import horovod_glue``); no
``__init__`` imports anything, so importing a package does no TensorFlow or Horovod work.
"""
