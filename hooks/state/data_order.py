"""The order of a training stream as a function of its position in the run, so that a run
resumed at step k reads the batches the uninterrupted run read from step k on.

tf.data's `shuffle(reshuffle_each_iteration=True)` reseeds each epoch from a counter of the
epochs *this iterator* went through: a resumed process starts it at 0 and replays epoch 0's
order (and two iterators of one pipeline share it). Here every permutation is stateless,
keyed by (key, epoch[, block]), and each element's augmentation seed by (key, its position
in the stream), so nothing depends on where the process started or on other iterators.
(Stateless ops also keep clear of `Dataset.shuffle`'s seed handling, which fails on a
tensor seed when the global seed is 0.)
"""
import secrets

import tensorflow as tf


def resolve_seed(seed: int | None) -> int:
    """`seed`, or a fresh random one (an unseeded run: positional, but not reproducible)."""
    return secrets.randbits(31) if seed is None else int(seed)


def start(position: int, epoch_size: int) -> tuple[int, int]:
    """(epoch, offset in it) of element `position` of a stream of `epoch_size`-element
    epochs."""
    if epoch_size < 1:
        raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
    return divmod(int(position), int(epoch_size))


def _seed(key: int, *parts) -> tf.Tensor:
    """A [2] int64 seed for stateless ops from `key` and int64 scalars `parts`."""
    mixed = tf.constant(key, tf.int64)
    for part in parts[:-1]:
        mixed = mixed * 1_000_003 + tf.cast(part, tf.int64)
    return tf.stack([mixed, tf.cast(parts[-1], tf.int64)])


def permutation(n: int, key: int, epoch) -> tf.Tensor:
    """0..n-1 in epoch `epoch`'s order (int64)."""
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                    seed=_seed(key, epoch))


def shuffled(values: tf.Tensor, key: int, epoch) -> tf.Tensor:
    """`values` (along its first axis) in epoch `epoch`'s order."""
    return tf.random.experimental.stateless_shuffle(values, seed=_seed(key, epoch))


def block_shuffle(ds: tf.data.Dataset, block: int, key: int, epoch) -> tf.data.Dataset:
    """`ds` with each run of `block` elements permuted, keyed by (key, epoch, block
    number): a shuffle buffer's locality for a stream that cannot be indexed."""
    def permute(number, elements):
        count = tf.shape(tf.nest.flatten(elements)[0], out_type=tf.int64)[0]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count), seed=_seed(key, epoch, number))
        return tf.data.Dataset.from_tensor_slices(
            tf.nest.map_structure(lambda t: tf.gather(t, order), elements))
    return ds.batch(block).enumerate().flat_map(permute)


def by_epoch(make_epoch, first_epoch: int = 0) -> tf.data.Dataset:
    """make_epoch(epoch) for epoch = first_epoch, first_epoch + 1, ... concatenated (epoch
    is an int64 scalar tensor)."""
    return tf.data.Dataset.counter(first_epoch, dtype=tf.int64).flat_map(make_epoch)


def with_position_seeds(ds: tf.data.Dataset, key: int, first_position: int = 0):
    """Pairs each element with a [2] int64 seed for stateless augmentation: (key, its
    position in the stream, counting from `first_position`)."""
    positions = tf.data.Dataset.counter(first_position, dtype=tf.int64)
    return tf.data.Dataset.zip((ds, positions)).map(lambda x, p: (x, _seed(key, p)))
