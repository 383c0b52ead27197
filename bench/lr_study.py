"""The large-batch learning-rate ladder on real data: sklearn's 1,797 8x8 digits.

Run (2 ranks; every run goes through hooks.training.loop.train on a DistributedTrainer):

    horovodrun -np 2 --gloo python -m bench.lr_study --output docs/lr_practices.md

A fixed budget of epochs for every rung; a small batch (32) as reference, then a large
batch with plain linear scaling, + warm-up, + polynomial decay, + weight-decay scaling,
+ a single collapse, + collapsed ensembles (cyclic phases, snapshots averaged); each over
several seeds. Rank 0 prints the table (test top-1, mean +- std) and writes it between
the study markers of the output markdown file.
"""
import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
TEST_FRACTION = 0.2  # a fixed held-out fifth: 360 of 1,797
SPLIT_SEED = 0


# ---------------------------------------------------------------- data
def load_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION,
                                              random_state=SPLIT_SEED, stratify=y)
    return (x_tr, y_tr), (x_te, y_te)


def train_stream(x, y, global_batch, total_steps, seed, context):
    """This rank's slice of `total_steps` global batches cut from reshuffled epochs."""
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    need = global_batch * total_steps
    order = np.concatenate([rng.permutation(len(x))
                            for _ in range(math.ceil(need / len(x)))])[:need]
    per_rank = global_batch // context.size
    rows = order.reshape(total_steps, context.size, per_rank)[:, context.rank].reshape(-1)
    return tf.data.Dataset.from_tensor_slices((x[rows], y[rows])).batch(per_rank)


def eval_shard(x, y, context, batch=128):
    import tensorflow as tf
    return tf.data.Dataset.from_tensor_slices(
        (x[context.rank::context.size], y[context.rank::context.size])).batch(batch)


# ---------------------------------------------------------------- model
def small_resnet(seed, widths=(16, 32), blocks=2, num_classes=10):
    """A few residual basic blocks with BN on 8x8x1; kernels carry L2 (replaced later)."""
    import keras
    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(0.0)
    conv = lambda f, k=3, s=1: keras.layers.Conv2D(f, k, strides=s, padding="same",
                                                   use_bias=False, kernel_regularizer=l2)
    bn = lambda: keras.layers.BatchNormalization(momentum=0.8)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.ReLU()(bn()(conv(widths[0])(inputs)))
    for stage, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            shortcut = x
            if stride != 1 or x.shape[-1] != width:
                shortcut = bn()(conv(width, 1, stride)(x))
            h = keras.layers.ReLU()(bn()(conv(width, 3, stride)(x)))
            h = bn()(conv(width)(h))
            x = keras.layers.ReLU()(keras.layers.Add()([shortcut, h]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=l2)(x)
    return keras.Model(inputs, outputs, name="digits_resnet")


# ---------------------------------------------------------------- the ladder
@dataclasses.dataclass
class Rung:
    name: str
    batch: int
    learning_rate: object  # LearningRateSchedule
    weight_decay: object   # step -> float
    total_steps: int
    snapshot_steps: tuple = ()


def _steps(args, n_train, batch):
    """(steps per epoch, total steps) of args.epochs at `batch`."""
    from hooks.practices import schedules as S
    spe = n_train / batch
    return spe, S.round_half_up(args.epochs * spe)


def _default_lr(args, n_train, batch, warmup):
    """The TPU step schedule (x0.1 at 30/60/80 of 90 epochs), optional warm-up."""
    from hooks.practices import schedules as S
    spe, total = _steps(args, n_train, batch)
    peak = S.scale_learning_rate(args.base_lr, batch)
    bounds = [S.round_half_up(args.epochs * f * spe) for f in (30 / 90, 60 / 90, 80 / 90)]
    decay = S.StepDecay(peak, bounds, [1.0, 0.1, 0.01, 0.001])
    w = S.to_steps(epochs=args.warmup_epochs, steps_per_epoch=spe) if warmup else 0
    return S.LinearWarmup(decay, w, peak / 16), total


def _phased(args, n_train, batch, specs):
    """Phases with lengths in epochs (fractional), lr as fractions of the peak."""
    from hooks.practices import schedules as S
    spe, total = _steps(args, n_train, batch)
    peak = S.scale_learning_rate(args.base_lr, batch)
    scaled = []
    for spec in specs:
        spec = dict(spec, epochs=spec["epochs"] * spe,
                    warmup_epochs=spec.get("warmup_epochs", 0.0) * spe)
        for key in ("peak_lr", "warmup_start_lr"):
            if key in spec:
                spec[key] *= peak
        scaled.append(spec)
    schedule = S.PhasedSchedule(S.phases_from_epochs(scaled, 1), total_steps=total)
    return schedule, total


def _const(v):
    return lambda step: v


def _step_rungs(args, n_train) -> list[Rung]:
    """The reference, linear scaling and warm-up rungs (constant weight decay)."""
    small, large, wd0 = args.small_batch, args.large_batch, args.weight_decay
    lr, total = _default_lr(args, n_train, small, warmup=False)
    rungs = [Rung(f"batch {small}, step decay (reference)", small, lr, _const(wd0), total)]
    lr, total = _default_lr(args, n_train, large, warmup=False)
    rungs.append(Rung(f"batch {large}, linear scaling", large, lr, _const(wd0), total))
    lr, total = _default_lr(args, n_train, large, warmup=True)
    rungs.append(Rung("+ warm-up", large, lr, _const(wd0), total))
    return rungs


def _collapsed_ensemble(E, W, wd_large, wd_final) -> list[dict]:
    """The SURFsara 4096 solver's shape (25/15/15/12/5 of 72 epochs, peaks
    1.6/1.02/0.764/0.572/0.143), scaled to E epochs and our peak."""
    f = E / 72
    return [dict(name="init", epochs=25 * f, peak_lr=1.0, power=1.0, warmup_epochs=W,
                 warmup_start_lr=1 / 16, weight_decay=wd_large),
            dict(name="cycle1", epochs=15 * f, peak_lr=1.02 / 1.6, power=2.0,
                 weight_decay=wd_large, snapshot=True),
            dict(name="cycle2", epochs=15 * f, peak_lr=0.764 / 1.6, power=2.0,
                 warmup_epochs=3 * f, weight_decay=wd_large, snapshot=True),
            dict(name="cycle3", epochs=12 * f, peak_lr=0.572 / 1.6, power=2.0,
                 warmup_epochs=3 * f, weight_decay=wd_large, snapshot=True),
            dict(name="collapse", epochs=5 * f, peak_lr=0.143 / 1.6, power=2.0,
                 weight_decay=wd_final, snapshot=True)]


def _phased_rungs(args, n_train) -> list[Rung]:
    """The polynomial-decay rungs at the large batch: plain, weight-decay scaling, single
    collapse, collapsed ensemble."""
    E, W, C = args.epochs, args.warmup_epochs, args.collapse_epochs
    wd0, wd_large, wd_final = args.weight_decay, args.weight_decay / 2, args.weight_decay * 2
    large = args.large_batch
    main = dict(name="main", epochs=E, peak_lr=1.0, power=1.0, warmup_epochs=W,
                warmup_start_lr=1 / 16)
    lr, total = _phased(args, n_train, large, [main])
    rungs = [Rung("+ polynomial decay (power 1)", large, lr, _const(wd0), total)]
    # Same lr curve, cut in two so the weight decay can change for the last C epochs.
    cut = (E - C - W) / (E - W)
    two = [dict(main, epochs=E - C, stop_fraction=cut, weight_decay=wd_large),
           dict(name="final", epochs=C, peak_lr=1 - cut, power=1.0, weight_decay=wd_final)]
    lr, total = _phased(args, n_train, large, two)
    rungs.append(Rung("+ weight-decay scaling (wd/2, then x4)", large, lr,
                      lr.weight_decay_at, total))
    # Single collapse: the linear decay stops at 9% of the peak (0.143/1.6 of the 4096
    # solver), then power 2 to zero over the last C epochs with the raised weight decay.
    one = [dict(main, epochs=E - C, stop_fraction=0.91, weight_decay=wd_large),
           dict(name="collapse", epochs=C, peak_lr=0.09, power=2.0, weight_decay=wd_final,
                snapshot=True)]
    lr, total = _phased(args, n_train, large, one)
    rungs.append(Rung("+ single collapse (power 2, wd x4)", large, lr, lr.weight_decay_at,
                      total, tuple(lr.snapshot_steps())))
    # Collapsed ensembles: 4 snapshots.
    lr, total = _phased(args, n_train, large, _collapsed_ensemble(E, W, wd_large, wd_final))
    rungs.append(Rung("+ collapsed ensemble (4 snapshots)", large, lr, lr.weight_decay_at,
                      total, tuple(lr.snapshot_steps())))
    return rungs


def build_ladder(args, n_train) -> list[Rung]:
    """The study's rungs, each adding one practice to the one before."""
    return _step_rungs(args, n_train) + _phased_rungs(args, n_train)


# ---------------------------------------------------------------- one run
def run_rung(rung: Rung, seed, data, context, args, workdir) -> dict[str, float]:
    import keras

    from hooks.distributed import horovod_glue
    from hooks.practices import snapshots, weight_decay
    from hooks.practices.time_to_accuracy import TimeToAccuracy
    from hooks.training import evaluation, loop
    (x_tr, y_tr), (x_te, y_te) = data
    network = small_resnet(seed)
    factor = weight_decay.attach_scheduled_l2(network, rung.weight_decay(0))
    optimizer = keras.optimizers.SGD(learning_rate=rung.learning_rate, momentum=0.9)
    trainer = horovod_glue.DistributedTrainer(
        network, context, metrics=[keras.metrics.SparseCategoricalAccuracy(name="top_1")])
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    horovod_glue.build_and_broadcast(trainer, optimizer, context)
    test = eval_shard(x_te, y_te, context)
    metric = keras.metrics.SparseCategoricalAccuracy(name="top_1")

    def evaluate():
        return evaluation.evaluate(network, test, [metric], context)[0]

    spe = len(x_tr) / rung.batch
    callbacks = [weight_decay.WeightDecayScheduler(rung.weight_decay, factor),
                 TimeToAccuracy("val_top_1", args.target, steps_per_epoch=spe)]
    saver = ensemble = None
    if len(rung.snapshot_steps) > 1:
        directory = os.path.join(workdir, f"{len(os.listdir(workdir))}")
        saver = snapshots.SnapshotSaver(list(rung.snapshot_steps), directory, context)
        ensemble = snapshots.CollapsedEnsembleEvaluator(saver.paths(), network, test, context)
        callbacks += [saver, ensemble]
    steps_per_loop = max(1, math.ceil(spe * args.eval_every_epochs))
    result = loop.train(
        trainer, loop.Input(train_stream(x_tr, y_tr, rung.batch, rung.total_steps, seed,
                                         context)),
        loop.Plan(rung.total_steps, steps_per_loop, rung.batch, spe), context=context,
        validation=loop.Validation(evaluate, steps_per_loop),
        progress=loop.Progress(print, every_n_steps=10 ** 9), extra_callbacks=callbacks)
    final = (result.last_eval["val_top_1"] if "val_top_1" in result.last_eval
             else evaluate()["top_1"])
    out = {"top_1": final, "seconds": result.wall_seconds,
           "epochs_to_target": (callbacks[1].reached or {}).get("epoch", math.nan)}
    if ensemble is not None:
        out["ensemble_top_1"] = ensemble.results["ensemble_top_1"]
    return out


# ---------------------------------------------------------------- report
def _fmt(values, scale=100.0, digits=1):
    import numpy as np
    values = np.asarray(values, dtype=float) * scale
    if np.all(np.isnan(values)):
        return "not reached"
    reached = values[~np.isnan(values)]
    text = f"{reached.mean():.{digits}f} ± {reached.std(ddof=0):.{digits}f}"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def table(rows, args) -> str:
    lines = [f"| technique | test top-1 % (mean ± std, {len(args.seeds)} seeds) | "
             f"epochs to {args.target:.0%} test top-1 | train s/run |",
             "|---|---|---|---|"]
    for name, results in rows:
        top = _fmt([r["top_1"] for r in results])
        if "ensemble_top_1" in results[0]:
            top = (f"{_fmt([r['ensemble_top_1'] for r in results])} ensemble; "
                   f"{top} last snapshot")
        lines.append(f"| {name} | {top} | {_fmt([r['epochs_to_target'] for r in results], 1)}"
                     f" | {sum(r['seconds'] for r in results) / len(results):.1f} |")
    return "\n".join(lines)


def write_doc(path, body):
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text or "# Learning-rate practices: a study on sklearn digits\n\n") + \
            "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=30.0, help="epoch budget of every run")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--small_batch", type=int, default=32, help="global batch (reference)")
    p.add_argument("--large_batch", type=int, default=512, help="global batch")
    p.add_argument("--base_lr", type=float, default=0.1, help="lr per 256 images (linear "
                   "scaling: lr = base_lr * global_batch / 256)")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--warmup_epochs", type=float, default=3.0)
    p.add_argument("--collapse_epochs", type=float, default=3.0)
    p.add_argument("--target", type=float, default=0.97, help="test top-1 for time-to-acc.")
    p.add_argument("--eval_every_epochs", type=float, default=3.0)
    p.add_argument("--only", default="", help="comma-separated rung indices (debugging)")
    p.add_argument("--output", default="", help="markdown file to write the table into")
    args = p.parse_args(argv)
    for name in ("epochs", "base_lr", "target", "eval_every_epochs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.collapse_epochs + args.warmup_epochs >= args.epochs:
        p.error(f"--warmup_epochs + --collapse_epochs must be < --epochs, got "
                f"{args.warmup_epochs} + {args.collapse_epochs} >= {args.epochs}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from hooks.distributed import horovod_glue
    context = horovod_glue.init()
    for batch in (args.small_batch, args.large_batch):
        if batch % context.size:
            raise SystemExit(f"lr_study: batch {batch} must divide by {context.size} ranks")
    data = load_split()
    rungs = build_ladder(args, len(data[0][0]))
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(rungs))
    workdir = tempfile.mkdtemp(prefix="lr_study-") if context.is_chief else ""
    workdir = horovod_glue.broadcast_object(workdir, context)  # one folder, one machine
    rows, t0 = [], time.perf_counter()
    try:
        for i in chosen:
            rung = rungs[i]
            results = [run_rung(rung, seed, data, context, args, workdir)
                       for seed in args.seeds]
            rows.append((rung.name, results))
            if context.is_chief:
                print(f"lr_study: {rung.name}: " + ", ".join(
                    f"{r['top_1']:.4f}" + (f" (ens {r['ensemble_top_1']:.4f})"
                                           if "ensemble_top_1" in r else "")
                    for r in results), flush=True)
    finally:
        if context.is_chief:
            shutil.rmtree(workdir, ignore_errors=True)
    if not context.is_chief:
        return
    n_train, n_test = len(data[0][0]), len(data[1][0])
    command = (f"horovodrun -np {context.size} --gloo python -m bench.lr_study "
               + " ".join(sys.argv[1:] if argv is None else argv))
    body = (f"Command: `{command}`\n\n"
            f"sklearn digits: {n_train} train / {n_test} test (fixed stratified fifth, "
            f"split seed {SPLIT_SEED}); small ResNet (4 basic blocks, BN momentum 0.8, "
            f"16/32 channels); "
            f"momentum SGD 0.9; {args.epochs:g} epochs for every run; base lr "
            f"{args.base_lr:g} per 256 images; weight decay {args.weight_decay:g} "
            f"(wd-scaling rungs: /2, then x4 for the last {args.collapse_epochs:g} epochs); "
            f"warm-up {args.warmup_epochs:g} epochs from peak/16; {context.size} ranks; "
            f"seeds {args.seeds}; total {time.perf_counter() - t0:.0f} s.\n\n"
            + table(rows, args))
    print(body, flush=True)
    if args.output:
        write_doc(args.output, body)


if __name__ == "__main__":
    from hooks import entry

    entry.quiet_startup()  # before TensorFlow is imported
    main()
