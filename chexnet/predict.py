"""``python -m chexnet predict --checkpoint=CKPT IMAGE...``: per-pathology probabilities
for PNG / JPEG / DICOM images, and with ``--heatmap_dir`` a Grad-CAM overlay per image.

Images get exactly the evaluation view of training (`chexnet.input_pipeline.eval_image`
and the backbone's normalisation). Single process.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

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
    """uint8 [H, W, 3] RGB from PNG/JPEG (grayscale and RGBA -> RGB) or DICOM (windowed
    to 0..255 by min/max, MONOCHROME1 inverted). DataError names an unreadable file."""
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    if _is_dicom(path):
        try:
            import pydicom

            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as err:  # pydicom raises many types
            raise DataError(f"{path}: cannot read DICOM pixels: {err}") from None
        if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
            pixels = pixels[..., :3].mean(axis=-1)
        elif pixels.ndim != 2:
            raise DataError(f"{path}: DICOM pixel array of shape {pixels.shape} is not a 2-D image")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        pixels = pixels * slope + intercept
        lo, hi = float(pixels.min()), float(pixels.max())
        gray = (pixels - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(pixels)
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            gray = 255.0 - gray
        gray = np.round(gray).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:
        raise DataError(f"{path}: cannot decode image: {err}") from None


def prepare(image: np.ndarray, options) -> tuple[np.ndarray, np.ndarray]:
    """Returns (network input float32 [size, size, 3], displayed crop uint8 [size, size, 3])
    through the evaluation pipeline's own functions."""
    from chexnet.input_pipeline import eval_image, preprocess_images

    crop = eval_image(image, options)
    return preprocess_images(crop, options.preprocessing).numpy(), crop.numpy()


def grad_cam(network, inputs: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of ``class_index`` at the last 4-D feature map:
    ReLU(sum_c mean(d p / d A_c) * A_c), normalised to 0..1, at feature-map resolution."""
    import keras
    import tensorflow as tf

    from chexnet.model import last_conv_layer

    layer = last_conv_layer(network)
    grad_model = keras.Model(network.inputs, [layer.output, network.output])
    x = tf.convert_to_tensor(inputs[None])
    with tf.GradientTape() as tape:
        fmap, probs = grad_model(x, training=False)
        target = probs[:, class_index]
    grads = tape.gradient(target, fmap)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # [1, C]
    cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))[0].numpy()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def save_overlay(path: str, crop: np.ndarray, cam: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    heat = tf.image.resize(cam[..., None], crop.shape[:2], method="bilinear").numpy()[..., 0]
    fig, ax = plt.subplots(figsize=(5, 5.3))
    ax.imshow(crop)
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def format_table(names: Sequence[str], probs: np.ndarray) -> str:
    short = [os.path.basename(n) for n in names]
    width = max(18, *(len(s) for s in short)) + 2
    lines = ["class".ljust(20) + "".join(s.rjust(width) for s in short)]
    for k, cls in enumerate(CLASS_NAMES):
        lines.append(
            cls.ljust(20) + "".join(f"{probs[i, k]:.4f}".rjust(width) for i in range(len(names)))
        )
    return "\n".join(lines)


def run(config: ChexnetConfig, images: Sequence[str], log=print) -> np.ndarray:
    """Probabilities [len(images), 14]; prints the table, writes CSV / heatmaps if asked."""
    from chexnet import evaluate, input_pipeline
    from chexnet import model as model_lib
    from hooks import checkpoints, horovod_glue

    if not images:
        raise ConfigError("predict needs at least one IMAGE argument")
    ckpt = evaluate.find_checkpoint(config.checkpoint or config.model_dir)
    pixels = [read_image(p) for p in images]  # all readable before any work
    backbone, size = ckpt.state["backbone"], int(ckpt.state["image_size"])
    network, _ = model_lib.build_chexnet_model(backbone, size)
    try:
        checkpoints.restore(ckpt, network)
    except checkpoints.CheckpointError as err:
        raise model_lib.ModelError(str(err)) from None
    options = input_pipeline.InputOptions(size, model_lib.preprocessing_for(backbone))
    prepared = [prepare(im, options) for im in pixels]
    batch = np.stack([p[0] for p in prepared])
    probs = np.asarray(network.predict(batch, verbose=0), np.float64)
    log(f"chexnet predict: {network.name} from {ckpt.path}")
    log(format_table(images, probs))
    context = horovod_glue.Context()
    if config.output_csv:

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["Image Index"] + [f"prob_{c}" for c in CLASS_NAMES])
                for name, row in zip(images, probs):
                    w.writerow([os.path.basename(name)] + [f"{p:.6f}" for p in row])

        horovod_glue.write_atomically(config.output_csv, write, context)
    if config.heatmap_dir:
        for path, (inputs, crop), row in zip(images, prepared, probs):
            k = int(np.argmax(row))
            cam = grad_cam(network, inputs, k)
            out = os.path.join(
                config.heatmap_dir, os.path.splitext(os.path.basename(path))[0] + "_gradcam.png"
            )
            title = f"{os.path.basename(path)}: {CLASS_NAMES[k]} {row[k]:.3f}"
            horovod_glue.write_atomically(out, lambda p: save_overlay(p, crop, cam, title), context)
            log(f"Grad-CAM ({CLASS_NAMES[k]}) -> {out}")
    return probs
