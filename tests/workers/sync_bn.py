"""A small conv net with batch norm (one after a DenseNet-style concat) on a fixed global
batch split over the ranks: one forward/backward pass, then 3 SGD steps of
`DistributedTrainer`. KIND picks the batch-norm class: `keras` (Keras's own layer: the
reference, run as one process), `fused`, `sync` or `syncfused` (imagenet.models.bn_class).

Every rank writes OUT_DIR/rank<r>.npz: its training-mode outputs, its input gradients, the
trainable-variable gradients averaged over the ranks (as the trainer averages them), the
moving statistics after that pass, and every weight after the 3 steps.
Usage: python -m tests.workers.sync_bn OUT_DIR GLOBAL_BATCH KIND [POLICY]
"""
import os
import sys

import numpy as np

from hooks.distributed import horovod_glue

KINDS = {"keras": (False, False), "fused": (True, False), "sync": (False, True),
         "syncfused": (True, True)}
STEPS = 3


def build(kind):
    import keras

    from imagenet import models

    bn = models.bn_class(*KINDS[kind])
    inputs = keras.Input((6, 6, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="conv_a")(inputs)
    a = keras.layers.ReLU()(bn(momentum=0.9, epsilon=1e-5, name="bn_a")(a))
    b = keras.layers.Conv2D(3, 3, padding="same", name="conv_b")(a)
    x = keras.layers.Concatenate()([a, b])  # DenseNet's pattern: BN after a concat
    x = keras.layers.ReLU()(bn(momentum=0.9, epsilon=1e-5, name="bn_c")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="head", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def data(global_batch):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(global_batch * (STEPS + 1), 6, 6, 3)) * 2 + 0.5).astype("float32")
    y = rng.normal(size=(global_batch * (STEPS + 1), 2)).astype("float32")
    return x, y


def rows(global_batch, ctx, steps):
    """This rank's contiguous share of each global batch (`rank_batch`, as grad_avg)."""
    first = sum(horovod_glue.rank_batch(global_batch, horovod_glue.Context(r, ctx.size))
                for r in range(ctx.rank))
    n = horovod_glue.rank_batch(global_batch, ctx)
    return np.concatenate([np.arange(s * global_batch + first, s * global_batch + first + n)
                           for s in steps])


def one_pass(net, x, y, ctx, weight):
    """Outputs, input gradients and rank-averaged variable gradients of the per-rank mean
    squared error times `weight` (the trainer's gradient_weight), one training-mode pass
    (which also updates the moving statistics)."""
    import tensorflow as tf

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = net(x, training=True)
            loss = tf.reduce_mean(tf.square(out - y)) * weight
        grads = tape.gradient(loss, [x] + net.trainable_variables)
        averaged = horovod_glue.allreduce_gradients(grads[1:], ctx)
        return out, grads[0], averaged

    out, grad_x, grads = step(tf.constant(x), tf.constant(y))
    result = {"out": out.numpy(), "grad_x": grad_x.numpy()}
    result.update({f"grad:{v.path}": g.numpy() for v, g in zip(net.trainable_variables, grads)})
    result.update({f"after_pass:{v.path}": v.numpy() for v in net.non_trainable_variables})
    return result


def main(out_dir, global_batch, kind, policy="float32"):
    ctx = horovod_glue.init()
    import keras

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(1)  # the same initial weights on every rank and run
    net = build(kind)
    x, y = data(global_batch)
    first = rows(global_batch, ctx, [0])
    per_rank = horovod_glue.rank_batch(global_batch, ctx)
    weight = per_rank * ctx.size / global_batch
    result = one_pass(net, x[first], y[first], ctx, weight)
    trainer = horovod_glue.DistributedTrainer(net, ctx, exact_metrics=False)
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    trainer.gradient_weight = weight
    trainer.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    horovod_glue.build_and_broadcast(trainer, optimizer, ctx)
    train = rows(global_batch, ctx, range(1, STEPS + 1))
    trainer.fit(x[train], y[train], batch_size=per_rank, epochs=1, shuffle=False, verbose=0)
    result.update({f"final:{v.path}": v.numpy() for v in net.weights})
    np.savez(os.path.join(out_dir, f"rank{ctx.rank}.npz"), size=ctx.size,
             rows=first, **result)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
