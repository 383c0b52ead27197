"""Draw a preset's learning rate and weight decay against epochs (a PNG).

    python -m hooks.plot_schedule --lr_schedule=surfsara_4096 --global_batch=4096 \
        --epochs=72 --output=schedule.png

Steps per epoch come from --steps_per_epoch or from --num_train_images (ImageNet's
1,281,167 by default) divided by --global_batch, rounded up. Phase boundaries are dotted
lines, collapsed-ensemble snapshots dashed red lines. Bad flags give a one-line error and
exit status 2.
"""
import argparse
import math
import sys
from collections.abc import Sequence

IMAGENET_TRAIN_IMAGES = 1281167


class FlagError(ValueError):
    """A bad command line; the message is the one line shown to the user."""


def parse_args(argv: Sequence[str]):
    from hooks.practices.schedules import PRESETS
    parser = argparse.ArgumentParser(prog="python -m hooks.plot_schedule",
                                     description="Plot a learning-rate preset as a PNG.")
    parser.add_argument("--lr_schedule", required=True, help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--global_batch", type=int, required=True,
                        help="global batch (all ranks together)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="run length in epochs (default: the preset's own)")
    parser.add_argument("--steps_per_epoch", type=int, default=None)
    parser.add_argument("--num_train_images", type=int, default=None,
                        help=f"images per epoch (default {IMAGENET_TRAIN_IMAGES:,} when "
                             "--steps_per_epoch is not given)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.lr_schedule not in PRESETS:
        raise FlagError(f"--lr_schedule must be one of {', '.join(PRESETS)}, got "
                        f"{args.lr_schedule!r}")
    if args.global_batch <= 0:
        raise FlagError(f"--global_batch must be > 0, got {args.global_batch}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise FlagError(f"--epochs must be > 0, got {args.epochs}")
    if args.steps_per_epoch is not None and args.num_train_images is not None:
        raise FlagError("give --steps_per_epoch or --num_train_images, not both")
    if args.steps_per_epoch is None:
        images = IMAGENET_TRAIN_IMAGES if args.num_train_images is None else args.num_train_images
        if images <= 0:
            raise FlagError(f"--num_train_images must be > 0, got {images}")
        args.steps_per_epoch = math.ceil(images / args.global_batch)
    if args.steps_per_epoch <= 0:
        raise FlagError(f"--steps_per_epoch must be > 0, got {args.steps_per_epoch}")
    if not args.output.lower().endswith(".png"):
        raise FlagError(f"--output must name a .png file, got {args.output!r}")
    return args


def curves(preset, steps_per_epoch: int, points: int = 1_000_000):
    """(epochs, lr, weight decay) at every step 0..total_steps (at most `points` of them)."""
    import numpy as np
    from keras import ops
    total = preset.total_steps
    steps = np.unique(np.linspace(0, total, min(points, total + 1)).round().astype(np.int64))
    lr = np.asarray(ops.convert_to_numpy(preset.learning_rate(steps)), np.float64)
    wd = np.asarray([preset.weight_decay.value_at(int(s)) for s in steps], np.float64)
    return steps / steps_per_epoch, lr, wd


def plot(preset, steps_per_epoch: int, global_batch: int, output: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hooks.practices.schedules import PhasedSchedule
    epochs, lr, wd = curves(preset, steps_per_epoch)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(epochs, lr, color="tab:blue", label="learning rate")
    ax.set_xlabel(f"epoch ({steps_per_epoch} steps each)")
    ax.set_ylabel("learning rate", color="tab:blue")
    ax.set_xlim(0, epochs[-1])
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.step(epochs, wd, where="post", color="tab:orange", label="weight decay")
    ax2.set_ylabel("weight decay", color="tab:orange")
    ax2.set_ylim(0, max(wd.max() * 1.3, 1e-8))
    schedule = preset.learning_rate
    if isinstance(schedule, PhasedSchedule):
        for end in schedule.phase_boundaries()[:-1]:
            ax.axvline(end / steps_per_epoch, color="grey", linestyle=":", linewidth=1)
    for i, step in enumerate(preset.snapshot_steps):
        ax.axvline(step / steps_per_epoch, color="tab:red", linestyle="--", linewidth=1,
                   label="snapshot" if i == 0 else None)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right")
    ax.set_title(f"{preset.name}: global batch {global_batch}, {preset.epochs:g} epochs, "
                 f"peak lr {lr.max():.4g}, optimizer {preset.optimizer}")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        from hooks.practices.schedules import preset
        chosen = preset(args.lr_schedule, global_batch=args.global_batch,
                        steps_per_epoch=args.steps_per_epoch, epochs=args.epochs)
        path = plot(chosen, args.steps_per_epoch, args.global_batch, args.output)
    except (FlagError, ValueError) as err:
        print(f"plot_schedule: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"plot_schedule: error: cannot write --output: {err}", file=sys.stderr)
        return 2
    print(f"plot_schedule: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
