"""``python -m chexnet predict --checkpoint=CKPT IMAGE...``: per-pathology probabilities
for PNG / JPEG / DICOM images, and with ``--heatmap_dir`` a Grad-CAM overlay per image.

Images are decoded (16-bit PNGs included) and prepared by the functions the training
pipeline evaluates with (`chexnet.input_pipeline.decode` and `network_input`), with the
view and normalisation recorded in the checkpoint. Output names (CSV rows, Grad-CAM
files) are unique per input path. Single process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from chexnet import reports
from chexnet.config import ChexnetConfig
from chexnet.labels import CLASS_NAMES
from hooks.errors import ConfigError, DataError

DICOM_EXTENSIONS = (".dcm", ".dicom")


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB from PNG/JPEG as training decodes them (`input_pipeline.decode`:
    grayscale and RGBA -> RGB, 16-bit -> high byte) or DICOM as a viewer shows it
    (`chexnet.dicom`: modality LUT, VOI LUT or first window, MONOCHROME1 inverted).
    DataError names an unreadable file."""
    from chexnet.input_pipeline import cannot_open

    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    why = cannot_open(path)
    if why:
        raise DataError(f"{path}: cannot read image ({why}): check its permissions")
    if _is_dicom(path):
        from chexnet.dicom import read_dicom

        return read_dicom(path)
    import tensorflow as tf

    from chexnet.input_pipeline import decode

    try:
        return decode(tf.io.read_file(path)).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
        first = (err.message or str(err)).splitlines()[0]
        raise DataError(f"{path}: cannot decode image: {first}") from None


def output_names(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(row names, Grad-CAM file names), unique per input path: the file name, or as many
    of its trailing folders as tell it apart from every other input ("a/x.png" and
    "b/x.png" -> a_x_gradcam.png, b_x_gradcam.png). ConfigError for a file given twice."""
    parts = [tuple(os.path.normpath(os.path.abspath(p)).split(os.sep)) for p in paths]
    first = {}
    for path, key in zip(paths, parts):
        if key in first:
            raise ConfigError(f"image {path} is given twice (also as {first[key]})")
        first[key] = path
    names = []
    for i, key in enumerate(parts):
        depth = 1
        while any(other[-depth:] == key[-depth:] for j, other in enumerate(parts) if j != i):
            depth += 1
        names.append("/".join(key[-depth:]))
    stems = [os.path.splitext(n)[0].replace("/", "_") for n in names]
    if len(set(stems)) < len(stems):  # x.png and x.jpg side by side: keep the extension
        stems = [n.replace("/", "_").replace(".", "_") for n in names]
    if len(set(stems)) < len(stems):  # names that only differ by "/" vs "_": number them
        stems = [f"{i:03d}_{stem}" for i, stem in enumerate(stems)]
    return names, [stem + "_gradcam.png" for stem in stems]


DISPLAY_SIZE = 512  # Grad-CAM overlays show the network's view at least this large


def prepare(image: np.ndarray, options) -> tuple[np.ndarray, np.ndarray]:
    """(network input float32 [size, size, 3], the same view for display uint8
    [D, D, 3], D = max(size, DISPLAY_SIZE)). The input is
    `chexnet.input_pipeline.network_input`, the evaluation pipeline's own function."""
    from chexnet.input_pipeline import eval_image, network_input

    inputs, view = network_input(image, options)
    if options.image_size < DISPLAY_SIZE:  # same field of view, sharper
        view = eval_image(image, dataclasses.replace(options, image_size=DISPLAY_SIZE))
    return inputs.numpy(), view.numpy()


FLAT_CAM = 0.05  # a normalised Grad-CAM whose max - min is below this shows nothing


def grad_cam(network, inputs: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of ``class_index`` at the last 4-D feature map A:
    ReLU(sum_c mean_xy(d logit / d A_c) * A_c), normalised to 0..1, at feature-map
    resolution. The logit (the head's input to its sigmoid), not the probability: a
    saturated sigmoid would scale every gradient towards 0. All zeros when no location
    raises the logit. A bfloat16 map (--precision=bfloat16) is differentiated as computed,
    then cast to float32."""
    import keras
    import tensorflow as tf

    from chexnet.model import head_layer, last_conv_layer

    layer, head = last_conv_layer(network), head_layer(network)
    grad_model = keras.Model(network.input, [layer.output, head.input])
    x = tf.convert_to_tensor(np.asarray(inputs[None], np.float32))
    with tf.GradientTape() as tape:
        # The tape records only ops on watched tensors: with the input watched, the whole
        # forward pass, whichever variables the tape watches by itself.
        tape.watch(x)
        fmap, features = grad_model(x, training=False)
        kernel = tf.cast(head.kernel, tf.float32)[:, class_index]
        logit = tf.reduce_sum(tf.cast(features, tf.float32) * kernel, axis=-1)
        if head.use_bias:
            logit += tf.cast(head.bias, tf.float32)[class_index]
    # The map as the network computed it: a cast made after the forward pass is not on the
    # path to the logit (no gradient).
    grads = tf.cast(tape.gradient(logit, fmap), tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # [1, C]
    fmap = tf.cast(fmap, tf.float32)
    cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))[0].numpy()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def is_flat(cam: np.ndarray) -> bool:
    """A map that points nowhere: all zeros, or (nearly) uniform, e.g. a 1x1 feature map."""
    return bool(cam.max() - cam.min() < FLAT_CAM)


def upsample(cam: np.ndarray, shape) -> np.ndarray:
    """Bilinear resize of a [h, w] map to ``shape`` (the displayed image's [H, W])."""
    import tensorflow as tf

    return tf.image.resize(cam[..., None].astype(np.float32), tuple(shape[:2]),
                           method="bilinear").numpy()[..., 0]


OVERLAY_ALPHA = 0.6  # opacity of the colour where the map is 1; 0 where it is 0


def overlay(view: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 RGB: the X-ray in grey with the map's colour (jet) blended in proportion to
    the map, so where the map is 0 the X-ray's own grey levels show unchanged. A flat map
    (`is_flat`) adds nothing."""
    from matplotlib import colormaps

    gray = view.astype(np.float64).mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    if is_flat(cam):
        return np.round(gray).astype(np.uint8)
    heat = np.clip(upsample(cam, view.shape), 0.0, 1.0).astype(np.float64)
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    alpha = OVERLAY_ALPHA * heat[..., None]
    return np.round(gray * (1 - alpha) + colour * alpha).astype(np.uint8)


def cam_title(name: str, class_name: str, prob: float, flat: bool) -> str:
    return f"{name}: {class_name} {prob:.3f}" + (
        "\nGrad-CAM flat: no region stands out" if flat else "")


def save_overlay(path: str, image: np.ndarray, title: str, boxes=()) -> None:
    """The overlay as a PNG; ``boxes``: (x, y, w, h, label) in the image's pixels, drawn
    as outlines (the NIH boxes of `chexnet.localize`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(image, interpolation="nearest")
    for x, y, w, h, label in boxes:
        # imshow puts pixel i's centre at i: its edges are at -0.5.
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="white", lw=1.5))
        ax.text(x - 0.5, y - 2, label, color="white", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def format_table(names: Sequence[str], probs: np.ndarray) -> str:
    width = max(18, *(len(s) for s in names)) + 2
    lines = ["class".ljust(20) + "".join(s.rjust(width) for s in names)]
    for k, cls in enumerate(CLASS_NAMES):
        lines.append(
            cls.ljust(20) + "".join(f"{probs[i, k]:.4f}".rjust(width) for i in range(len(names)))
        )
    return "\n".join(lines)


def predict_export(model_dir: str, pixels: Sequence[np.ndarray], log=print) -> np.ndarray:
    """Probabilities from a SavedModel of `chexnet export` (one image per call: sizes
    may differ)."""
    from chexnet import export

    loaded = export.load(model_dir)
    log(f"chexnet predict: SavedModel {model_dir} (preprocessing in the graph)")
    return np.concatenate([np.asarray(loaded.serve(im[None]), np.float64) for im in pixels])


def run(config: ChexnetConfig, images: Sequence[str], log=print) -> np.ndarray:
    """Probabilities [len(images), 14] from a checkpoint or an export (--model); prints
    the table and any warning (collapsed or saturated predictions), writes CSV,
    localization and Grad-CAM overlays if asked."""
    from chexnet import evaluate, metrics
    from chexnet import model as model_lib
    from hooks.distributed import horovod_glue
    from hooks.state import checkpoints

    if not images:
        raise ConfigError("predict needs at least one IMAGE argument")
    names, heat_files = output_names(images)
    ckpt = None if config.model else evaluate.find_checkpoint(config.checkpoint
                                                              or config.model_dir)
    pixels = [read_image(p) for p in images]  # all readable before any work
    boxes = None
    if config.boxes_csv:
        from chexnet import localize

        boxes = localize.read_boxes(config.boxes_csv)
    if ckpt is None:
        probs = predict_export(config.model, pixels, log)
    else:
        backbone, size = ckpt.state["backbone"], int(ckpt.state["image_size"])
        network, _ = model_lib.build_chexnet_model(backbone, size)
        try:
            checkpoints.restore(ckpt, network)
        except checkpoints.CheckpointError as err:
            raise model_lib.ModelError(str(err)) from None
        options = model_lib.input_options(ckpt.state)
        prepared = [prepare(im, options) for im in pixels]
        probs = np.asarray(network.predict(np.stack([p[0] for p in prepared]), verbose=0),
                           np.float64)
        log(f"chexnet predict: {network.name} from {ckpt.path} (input {options.view} {size} "
            f"px, {options.preprocessing} normalisation)")
    log(format_table(names, probs))
    for warning in metrics.prediction_warnings(probs):
        log(f"WARNING: {warning}")
    context = horovod_glue.Context()
    if config.output_csv:
        reports.write_predictions_csv(config.output_csv, names, probs, context)
    if boxes is not None:
        from chexnet import localize

        items = [(n, im, boxes[os.path.basename(p)], row)
                 for n, p, im, row in zip(names, images, pixels, probs)
                 if os.path.basename(p) in boxes]
        rows = localize.localize(network, items, options, config.cam_threshold,
                                 config.heatmap_dir, log)
        log(localize.markdown(rows, config.cam_threshold, f"{len(items)} of {len(images)} "
                              "images have boxes"))
    if config.heatmap_dir:
        write_overlays(network, names, heat_files, prepared, probs, config.heatmap_dir, log)
    return probs


def write_overlays(network, names, heat_files, prepared, probs, heatmap_dir, log) -> None:
    """One Grad-CAM overlay per image, of its most probable class."""
    from hooks.distributed import horovod_glue

    context = horovod_glue.Context()
    for name, heat_file, (inputs, view), row in zip(names, heat_files, prepared, probs):
        k = int(np.argmax(row))
        cam = grad_cam(network, inputs, k)
        out = os.path.join(heatmap_dir, heat_file)
        flat = is_flat(cam)
        title = cam_title(name, CLASS_NAMES[k], row[k], flat)
        image = overlay(view, cam)
        horovod_glue.write_atomically(out, lambda p: save_overlay(p, image, title), context)
        log(f"Grad-CAM ({CLASS_NAMES[k]}) -> {out}"
            + (" (flat: no region stands out)" if flat else ""))
