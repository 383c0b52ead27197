"""``python -m chexnet export --checkpoint=CKPT --export_dir=DIR``: a TensorFlow SavedModel
that needs nothing of this project to run.

Signatures (``tf.saved_model.save`` of a ``tf.Module`` holding the Keras network and
``tf.function``s): ``serve`` (also ``serving_default``) takes a uint8
batch [N, H, W, C] of any N, H, W, with C = 1 (grey) or 3 (RGB); ``serve_uint16`` the same
in uint16 (16-bit PNGs: their high byte, as training decodes them). Both return the 14
probabilities [N, 14] in ``CLASS_NAMES`` order. Grey becomes RGB, then the checkpoint's
view (whole image or centre crop), size and normalisation run in the graph: the very
functions the evaluation pipeline uses (`input_pipeline.eval_image`,
`preprocess_images`). ``assets/class_names.txt`` and ``assets/chexnet.json`` say what
the outputs are and how the model was made.
"""

from __future__ import annotations

import json
import os
import time

from chexnet.labels import CLASS_NAMES
from hooks.errors import ConfigError

SIGNATURES = ("serve", "serve_uint16")


def serving_fn(network, options):
    """Raw pixel batch -> probabilities, in TensorFlow ops only (traceable)."""
    import tensorflow as tf

    from chexnet.input_pipeline import eval_image, preprocess_images

    size = options.image_size

    def serve(images):
        if images.dtype == tf.uint16:
            images = tf.bitwise.right_shift(images, 8)
        images = tf.cast(images, tf.uint8)
        tf.debugging.assert_rank(images, 4, message="images must be [N, H, W, C]")
        channels = tf.shape(images)[-1]
        tf.debugging.Assert(tf.logical_or(tf.equal(channels, 1), tf.equal(channels, 3)),
                            ["images need 1 (grey) or 3 (RGB) channels, got", channels])
        images = tf.cond(tf.equal(channels, 1), lambda: tf.tile(images[..., :1], [1, 1, 1, 3]),
                         lambda: images[..., :3])
        views = tf.map_fn(lambda im: eval_image(im, options), images,
                          fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        return network(preprocess_images(views, options.preprocessing), training=False)

    return serve


def export(ckpt, export_dir: str, log=print) -> str:
    """Write the SavedModel of a chexnet checkpoint to ``export_dir`` (which must not exist
    or be empty: an export is never merged into other files)."""
    import tensorflow as tf

    from chexnet import model as model_lib
    from hooks.state import checkpoints

    if os.path.islink(export_dir):
        raise ConfigError(f"--export_dir={export_dir} is a symbolic link")
    if os.path.exists(export_dir) and (not os.path.isdir(export_dir) or os.listdir(export_dir)):
        raise ConfigError(f"--export_dir={export_dir} exists and is not an empty folder")
    state = ckpt.state
    network, _ = model_lib.build_chexnet_model(state["backbone"], int(state["image_size"]))
    try:
        checkpoints.restore(ckpt, network)
    except checkpoints.CheckpointError as err:
        raise model_lib.ModelError(str(err)) from None
    options = model_lib.input_options(state)
    serve = serving_fn(network, options)
    module = tf.Module()
    module.network = network  # tracked: its variables are saved once
    for name, dtype in zip(SIGNATURES, (tf.uint8, tf.uint16)):
        setattr(module, name, tf.function(
            serve, input_signature=[tf.TensorSpec([None, None, None, None], dtype)]))
    t0 = time.perf_counter()
    # tf.saved_model.save, not keras.export.ExportArchive: the archive (Keras 3.x here)
    # stored every weight twice (86 MiB for ResNet-18's 43 MiB).
    tf.saved_model.save(module, export_dir, signatures={
        "serving_default": module.serve, **{n: getattr(module, n) for n in SIGNATURES}})
    assets = os.path.join(export_dir, "assets")
    os.makedirs(assets, exist_ok=True)
    with open(os.path.join(assets, "class_names.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    with open(os.path.join(assets, "chexnet.json"), "w") as f:
        json.dump({"checkpoint": ckpt.path, "backbone": state["backbone"],
                   "image_size": options.image_size, "image_view": options.view,
                   "preprocessing": options.preprocessing, "class_names": list(CLASS_NAMES),
                   "signatures": list(SIGNATURES)}, f, indent=1)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(export_dir)
               for n in files)
    log(f"chexnet export: {network.name} from {ckpt.path} -> {export_dir} "
        f"({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s; input uint8/uint16 "
        f"[N, H, W, 1|3], {options.view} {options.image_size} px, {options.preprocessing} "
        "normalisation in the graph)")
    return export_dir


def run(config, context, log=print) -> str:
    """``chexnet export``."""
    from chexnet import evaluate

    return export(evaluate.find_checkpoint(config.checkpoint or config.model_dir),
                  config.export_dir, log)


def load(export_dir: str):
    """The loaded SavedModel: ``.serve(uint8 [N, H, W, C]) -> [N, 14]`` (keep the object
    while calling: its variables live in it)."""
    import tensorflow as tf

    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise ConfigError(f"--model={export_dir} is not a SavedModel folder (no "
                          "saved_model.pb): write one with `python -m chexnet export`")
    return tf.saved_model.load(export_dir)
