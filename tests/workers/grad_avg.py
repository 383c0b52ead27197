"""Train a small BN-free model for 3 SGD steps on a fixed global batch, split over ranks
(unevenly when the ranks do not divide it: each gradient weighted by its share, as elastic
runs do).

Run with 1 process (no launcher) or under horovodrun/mpirun; every rank writes its final
weights (and the initial ones after the broadcast, as init_<i>) to
OUT_DIR/weights-rank<r>.npz so the test can compare them. With a third argument `fp16` the
gradients are allreduced in float16 (resnet_main's --fp16_allreduce).
Usage: python -m tests.workers.grad_avg OUT_DIR GLOBAL_BATCH [fp16]
"""
import os
import sys

import numpy as np

from hooks.distributed import horovod_glue


def main(out_dir, global_batch, steps=3, fp16_allreduce=False):
    ctx = horovod_glue.init()
    import keras  # after init: nothing here depends on it, but keep TF start-up after Horovod

    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * steps, 6)).astype("float32")
    y = rng.integers(0, 3, size=(global_batch * steps,))
    per_rank = horovod_glue.rank_batch(global_batch, ctx)
    first = sum(horovod_glue.rank_batch(global_batch, horovod_glue.Context(r, ctx.size))
                for r in range(ctx.rank))
    # Step s uses global rows [s*B, (s+1)*B); this rank takes its contiguous slice of them.
    rows = np.concatenate([np.arange(s * global_batch + first,
                                     s * global_batch + first + per_rank)
                           for s in range(steps)])
    keras.utils.set_random_seed(1 + ctx.rank)  # different init per rank: broadcast must fix it
    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                            keras.layers.Dense(3)])
    trainer = horovod_glue.DistributedTrainer(
        net, ctx, metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        fp16_allreduce=fp16_allreduce)
    optimizer = keras.optimizers.SGD(learning_rate=0.5, momentum=0.9)
    trainer.gradient_weight = per_rank * ctx.size / global_batch
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    if ctx.size == 1:
        keras.utils.set_random_seed(1)
        net.set_weights([w for w in net.get_weights()])
    horovod_glue.build_and_broadcast(trainer, optimizer, ctx)
    initial = {f"init_{i}": w for i, w in enumerate(net.get_weights())}
    history = trainer.fit(x[rows], y[rows], batch_size=per_rank, epochs=1, shuffle=False,
                          verbose=0)
    np.savez(os.path.join(out_dir, f"weights-rank{ctx.rank}.npz"), *net.get_weights(),
             loss=np.float64(history.history["loss"][-1]), size=ctx.size, **initial)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), fp16_allreduce=sys.argv[3:] == ["fp16"])
