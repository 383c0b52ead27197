"""Train a tiny model through hooks.training.loop.train with a warm-up + poly schedule and
snapshots.

Every rank writes OUT_DIR/lr-rank<r>.json: the global step and learning rate seen before
each step, and the snapshot files this rank wrote (rank 0 only should write any).
Usage: python -m tests.workers.lr_warmup OUT_DIR   (under horovodrun -np 2)
"""
import json
import os
import sys

TOTAL_STEPS = 10
SNAPSHOT_STEPS = (4, 10)
SCHEDULE = {"peak_lr": 0.4, "warmup_steps": 4, "start_lr": 0.05}
GLOBAL_BATCH = 8


def main(out_dir):
    from hooks.distributed import horovod_glue
    ctx = horovod_glue.init()
    import keras
    import numpy as np
    import tensorflow as tf

    from hooks.practices import schedules as S
    from hooks.practices import snapshots
    from hooks.training import loop

    per_rank = GLOBAL_BATCH // ctx.size
    rng = np.random.default_rng(ctx.rank)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 3, size=64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(per_rank)

    keras.utils.set_random_seed(1 + ctx.rank)
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    schedule = S.LinearWarmup(
        S.PolynomialDecay(SCHEDULE["peak_lr"], TOTAL_STEPS - SCHEDULE["warmup_steps"],
                          power=2.0, start_step=SCHEDULE["warmup_steps"]),
        SCHEDULE["warmup_steps"], SCHEDULE["start_lr"])
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
    trainer = horovod_glue.DistributedTrainer(net, ctx)
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    horovod_glue.build_and_broadcast(trainer, optimizer, ctx)

    record = {"steps": [], "lr": [], "size": ctx.size}

    def before_step(batch, logs):
        record["steps"].append(int(optimizer.iterations.numpy()))
        record["lr"].append(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))

    saver = snapshots.SnapshotSaver(list(SNAPSHOT_STEPS), os.path.join(out_dir, "snaps"), ctx)
    loop.train(trainer, loop.Input(dataset), loop.Plan(TOTAL_STEPS, 3, GLOBAL_BATCH, 8.0),
               context=ctx, extra_callbacks=[
                   keras.callbacks.LambdaCallback(on_train_batch_begin=before_step), saver])
    record["saved"] = saver.saved
    with open(os.path.join(out_dir, f"lr-rank{ctx.rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
