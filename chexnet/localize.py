"""Grad-CAM scored against the NIH bounding boxes (BBox_List_2017.csv: 984 boxes drawn
by radiologists on 880 images, 8 findings), in the ORIGINAL image's pixel coordinates.

Per (image, finding): the Grad-CAM of that finding's class is mapped back onto the
original image (through the evaluation view: whole image, or the centre crop), then
- pointing game (Zhang et al. 2016, no tolerance): a hit when the map's maximum lies in
  one of the image's boxes of that finding;
- IoU of the thresholded map (value >= threshold x its maximum) with those boxes.
A pixel (row r, column c) is in box (x, y, w, h) when its centre (c + 0.5, r + 0.5) is.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
from collections.abc import Sequence

import numpy as np

from chexnet.labels import CLASS_INDEX
from hooks.errors import DataError

# BBox_List_2017 names one finding differently from the label CSV.
BOX_FINDING_NAMES = {"Infiltrate": "Infiltration"}
DEFAULT_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Box:
    finding: str  # a CLASS_NAMES entry
    x: float
    y: float
    w: float
    h: float


def read_boxes(path: str) -> dict[str, list[Box]]:
    """Image name -> its boxes, from BBox_List_2017.csv (plain or .gz). DataError names
    the file and line of a row that is not ``name,finding,x,y,w,h``."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    boxes: dict[str, list[Box]] = {}
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{path}: cannot read boxes: {err}") from None
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        finding = BOX_FINDING_NAMES.get(row[1].strip(), row[1].strip()) if len(row) > 1 else ""
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise DataError(f"{path}:{line_no}: box must be 4 numbers x,y,w,h") from None
        if finding not in CLASS_INDEX or w <= 0 or h <= 0:
            raise DataError(f"{path}:{line_no}: bad box {row[:6]} (finding {finding!r})")
        boxes.setdefault(row[0].strip(), []).append(Box(finding, x, y, w, h))
    return boxes


def view_region(shape, options) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1): the part of an original [H, W] image the evaluation view shows
    (`input_pipeline.eval_image`): all of it ("whole"), or the centre crop ("crop")."""
    h, w = shape[:2]
    if options.view == "whole":
        return 0.0, 0.0, float(h), float(w)
    scale = options.resize_to / min(h, w)
    rh, rw = max(round(h * scale), options.resize_to), max(round(w * scale), options.resize_to)
    oy, ox = (rh - options.image_size) // 2, (rw - options.image_size) // 2
    return (oy * h / rh, ox * w / rw, (oy + options.image_size) * h / rh,
            (ox + options.image_size) * w / rw)


def to_original(cam: np.ndarray, shape, region) -> np.ndarray:
    """The [h, w] map bilinearly resized onto ``region`` of an original [H, W] image;
    0 outside it."""
    from chexnet.predict import upsample

    y0, x0, y1, x1 = (int(round(v)) for v in region)
    out = np.zeros(shape[:2], np.float32)
    out[y0:y1, x0:x1] = upsample(cam, (y1 - y0, x1 - x0))
    return out


def box_mask(shape, boxes: Sequence[Box]) -> np.ndarray:
    """Boolean [H, W]: pixels whose centre lies in any of ``boxes``."""
    rows = np.arange(shape[0])[:, None] + 0.5
    cols = np.arange(shape[1])[None, :] + 0.5
    mask = np.zeros(shape[:2], bool)
    for b in boxes:
        mask |= (cols >= b.x) & (cols <= b.x + b.w) & (rows >= b.y) & (rows <= b.y + b.h)
    return mask


def score_map(heat: np.ndarray, boxes: Sequence[Box], threshold: float) -> tuple[bool, float]:
    """(pointing-game hit, IoU of ``heat >= threshold * max`` with the boxes) of a map in
    original coordinates. A map that is 0 everywhere misses, IoU 0."""
    inside = box_mask(heat.shape, boxes)
    peak = heat.max()
    if peak <= 0:
        return False, 0.0
    hit = bool(inside.flat[int(np.argmax(heat))])
    hot = heat >= threshold * peak
    return hit, float((hot & inside).sum() / (hot | inside).sum())


@dataclasses.dataclass(frozen=True)
class Scored:
    image: str
    finding: str
    hit: bool
    iou: float
    probability: float
    flat: bool


def summarise(rows: Sequence[Scored]) -> list[dict]:
    """Per finding (in CLASS_NAMES order): boxed images, hits, hit rate, mean IoU."""
    out = []
    for finding in CLASS_INDEX:
        mine = [r for r in rows if r.finding == finding]
        if mine:
            out.append({"finding": finding, "images": len(mine),
                        "hits": sum(r.hit for r in mine),
                        "hit_rate": sum(r.hit for r in mine) / len(mine),
                        "mean_iou": float(np.mean([r.iou for r in mine])),
                        "flat_maps": sum(r.flat for r in mine)})
    return out


def markdown(rows: Sequence[Scored], threshold: float, title: str = "") -> str:
    table = summarise(rows)
    lines = [f"### Grad-CAM localization: {title}" if title else "### Grad-CAM localization",
             "", "| finding | boxed images | pointing-game hits | hit rate | "
             f"mean IoU (map >= {threshold:g} x max) | flat maps |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['finding']} | {t['images']} | {t['hits']} | {t['hit_rate']:.3f} | "
                     f"{t['mean_iou']:.3f} | {t['flat_maps']} |")
    total = len(rows)
    if total:
        hits = sum(r.hit for r in rows)
        lines.append(f"| **all** | {total} | {hits} | {hits / total:.3f} | "
                     f"{np.mean([r.iou for r in rows]):.3f} | {sum(r.flat for r in rows)} |")
    else:
        lines += ["", "No evaluated image has a box."]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[Scored]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "finding", "hit", "iou", "probability", "flat_map"])
        for r in rows:
            w.writerow([r.image, r.finding, int(r.hit), f"{r.iou:.4f}",
                        f"{r.probability:.6f}", int(r.flat)])


def display_boxes(boxes: Sequence[Box], region, display: int) -> list[tuple]:
    """Boxes as (x, y, w, h, finding) in the pixels of a ``display`` x ``display`` view
    of ``region`` (the overlay's coordinates)."""
    y0, x0, y1, x1 = region
    sy, sx = display / (y1 - y0), display / (x1 - x0)
    return [((b.x - x0) * sx, (b.y - y0) * sy, b.w * sx, b.h * sy, b.finding) for b in boxes]


def localize(network, items, options, threshold: float, overlay_dir: str | None = None,
             log=print) -> list[Scored]:
    """Score the Grad-CAM of every boxed finding of ``items``: (name, pixels uint8
    [H, W, 3] as read, boxes, probabilities [14]). With ``overlay_dir``, one overlay per
    (image, finding), the boxes drawn on it: NAME_<finding>_box.png."""
    import os

    from chexnet import predict
    from hooks.distributed.horovod_glue import Context, write_atomically

    rows = []
    for name, pixels, boxes, probs in items:
        inputs, view = predict.prepare(pixels, options)
        region = view_region(pixels.shape, options)
        for finding in sorted({b.finding for b in boxes}, key=CLASS_INDEX.get):
            mine = [b for b in boxes if b.finding == finding]
            k = CLASS_INDEX[finding]
            cam = predict.grad_cam(network, inputs, k)
            hit, iou = score_map(to_original(cam, pixels.shape, region), mine, threshold)
            flat = predict.is_flat(cam)
            rows.append(Scored(name, finding, hit, iou, float(probs[k]), flat))
            if overlay_dir:
                stem = os.path.splitext(name.replace("/", "_"))[0]
                out = os.path.join(overlay_dir, f"{stem}_{finding}_box.png")
                image = predict.overlay(view, cam)
                title = (predict.cam_title(name, finding, float(probs[k]), flat)
                         + f"\nbox: {'hit' if hit else 'miss'}, IoU {iou:.2f}")
                drawn = display_boxes(mine, region, view.shape[0])
                write_atomically(out, lambda p: predict.save_overlay(p, image, title, drawn),
                                 Context())
                log(f"Grad-CAM ({finding}, box) -> {out}")
    return rows
