"""Grad-CAM against NIH boxes (`chexnet.localize`): pointing game and IoU against numpy on
synthetic maps and boxes, the view's geometry against the pipeline's own crop, a tiny
network whose Grad-CAM is a bright square, and the shared sample X-rays that have boxes."""

import csv

import keras
import numpy as np
import pytest

from chexnet import localize, predict
from chexnet.input_pipeline import InputOptions, eval_image
from chexnet.labels import CLASS_INDEX, CLASS_NAMES
from hooks.errors import DataError

from .conftest import shared_data
from .test_chexnet_gradcam import bilinear

BOXES = shared_data("chestxray14", "BBox_List_2017.csv.gz")


def test_read_boxes_of_the_nih_file(tmp_path):
    boxes = localize.read_boxes(BOXES)
    assert len(boxes) == 880 and sum(len(v) for v in boxes.values()) == 984
    findings = {b.finding for v in boxes.values() for b in v}
    assert len(findings) == 8 and "Infiltration" in findings  # the file says "Infiltrate"
    b = boxes["00013118_008.png"][0]
    assert (b.finding, b.x, b.y) == ("Atelectasis", pytest.approx(225.0847457627),
                                      pytest.approx(547.0192167637))
    bad = tmp_path / "b.csv"
    bad.write_text("Image Index,Finding Label,x,y,w,h\na.png,Mass,1,2,x,4\n")
    with pytest.raises(DataError, match=r"b.csv:2: box must be 4 numbers"):
        localize.read_boxes(str(bad))
    bad.write_text("Image Index,Finding Label,x,y,w,h\na.png,Tumour,1,2,3,4\n")
    with pytest.raises(DataError, match=r"b.csv:2: bad box .*'Tumour'"):
        localize.read_boxes(str(bad))


@pytest.mark.parametrize("seed", range(4))
def test_pointing_game_and_iou_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    heat = rng.uniform(0, 0.4, (90, 120))
    y, x, h, w = 20, 30, 25, 40  # the map's hot region
    heat[y:y + h, x:x + w] += 0.5
    py, px = rng.integers(0, 90), rng.integers(0, 120)
    heat[py, px] = 2.0  # the maximum
    boxes = [localize.Box("Mass", float(bx), float(by), float(bw), float(bh))
             for bx, by, bw, bh in [(rng.integers(0, 60), rng.integers(0, 50), 35, 30),
                                    (rng.integers(0, 60), rng.integers(0, 50), 20, 15)]]
    inside = np.zeros(heat.shape, bool)
    for b in boxes:  # integer boxes: pixel centres inside <=> these slices
        inside[int(b.y):int(b.y + b.h), int(b.x):int(b.x + b.w)] = True
    for threshold in (0.2, 0.3, 0.5):
        hot = heat >= threshold * 2.0
        hit, iou = localize.score_map(heat, boxes, threshold)
        assert hit == bool(inside[py, px])
        assert iou == pytest.approx((hot & inside).sum() / (hot | inside).sum(), abs=1e-12)
    assert localize.score_map(np.zeros((5, 5)), boxes[:1], 0.5) == (False, 0.0)


@pytest.mark.parametrize("view", ["whole", "crop"])
@pytest.mark.parametrize("shape", [(300, 220), (220, 300), (256, 256)])
def test_view_region_is_the_pipelines_field_of_view(view, shape):
    """A bright 4x4 dot in the original, seen through `eval_image` (the pipeline's view),
    mapped back through `view_region`, lands on the dot."""
    options = InputOptions(64, view=view)
    y0, x0, y1, x1 = localize.view_region(shape, options)
    for dy, dx in [(0.45, 0.5), (0.3, 0.35), (0.6, 0.7)]:
        image = np.zeros(shape + (3,), np.uint8)
        r, c = int(shape[0] * dy), int(shape[1] * dx)
        image[r:r + 4, c:c + 4] = 255
        seen = eval_image(image, options).numpy()[..., 0].astype(float)
        vr, vc = np.unravel_index(np.argmax(seen), seen.shape)
        back_r = y0 + (vr + 0.5) * (y1 - y0) / 64
        back_c = x0 + (vc + 0.5) * (x1 - x0) / 64
        scale = max((y1 - y0) / 64, (x1 - x0) / 64)
        assert abs(back_r - (r + 2)) <= 2 + scale and abs(back_c - (c + 2)) <= 2 + scale


def test_to_original_is_bilinear_on_the_region():
    rng = np.random.default_rng(0)
    cam = rng.uniform(size=(4, 4))
    out = localize.to_original(cam, (100, 80), (10.0, 0.0, 90.0, 80.0))
    np.testing.assert_allclose(out[10:90], bilinear(cam, 80, 80), atol=1e-5)
    assert not out[:10].any() and not out[90:].any()


def _bright_square_network(size=32):
    """Conv 1x1 (sum of channels, ReLU) -> average pool -> sigmoid head with positive
    weights: the Grad-CAM of every class is the bright part of the view."""
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, 1, activation="relu")
    head = keras.layers.Dense(14, activation="sigmoid")
    network = keras.Model(inputs, head(keras.layers.GlobalAveragePooling2D()(conv(inputs))))
    conv.set_weights([np.ones((1, 1, 3, 1), np.float32), np.zeros(1, np.float32)])
    head.set_weights([np.ones((1, 14), np.float32), np.zeros(14, np.float32)])
    return network


@pytest.mark.parametrize("view", ["whole", "crop"])
def test_a_bright_square_is_found_in_its_box(view, tmp_path):
    image = np.full((240, 320, 3), 20, np.uint8)
    image[100:160, 140:220] = 250  # the finding, x 140..220, y 100..160
    on = localize.Box("Mass", 140.0, 100.0, 80.0, 60.0)
    off = localize.Box("Nodule", 20.0, 20.0, 60.0, 50.0)
    options = InputOptions(32, view=view)
    rows = localize.localize(_bright_square_network(), [("x.png", image, [on, off],
                                                         np.full(14, 0.5))],
                             options, 0.5, str(tmp_path), log=lambda *a: None)
    by = {r.finding: r for r in rows}
    assert by["Mass"].hit and by["Mass"].iou > 0.75
    assert not by["Nodule"].hit and by["Nodule"].iou == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_Mass_box.png", "x_Nodule_box.png"]
    table = localize.summarise(rows)
    assert [(t["finding"], t["images"], t["hits"]) for t in table] == [("Mass", 1, 1),
                                                                       ("Nodule", 1, 0)]


def test_display_boxes_follow_the_view():
    options = InputOptions(224, view="whole")
    region = localize.view_region((1024, 1024), options)
    [(x, y, w, h, f)] = localize.display_boxes([localize.Box("Mass", 512, 256, 128, 64)],
                                               region, 512)
    assert (x, y, w, h, f) == (256, 128, 64, 32, "Mass")


def test_shared_sample_xrays_with_boxes(tmp_path):
    """The shared sample images that have NIH boxes, through a small random network: every
    boxed finding is scored, and hit / IoU equal the numpy computation on its Grad-CAM."""
    from chexnet import model as model_lib

    boxes = localize.read_boxes(BOXES)
    folder = shared_data("chestxray14", "images")
    import os

    names = sorted(n for n in os.listdir(folder) if n in boxes)
    assert len(names) == 2  # 00001933_000 (Pneumonia), 00013911_000 (Nodule)
    keras.utils.set_random_seed(0)
    network, _ = model_lib.build_chexnet_model("resnet18", 64)
    options = InputOptions(64, view="whole")
    items = [(n, predict.read_image(os.path.join(folder, n)), boxes[n], np.full(14, 0.5))
             for n in names]
    rows = localize.localize(network, items, options, 0.5, str(tmp_path), log=lambda *a: None)
    assert [(r.image, r.finding) for r in rows] == [("00001933_000.png", "Pneumonia"),
                                                    ("00013911_000.png", "Nodule")]
    for (name, pixels, bxs, _), row in zip(items, rows):
        cam = predict.grad_cam(network, predict.prepare(pixels, options)[0],
                               CLASS_INDEX[row.finding])
        heat = bilinear(cam, *pixels.shape[:2])
        [b] = bxs
        cols, rws = np.arange(heat.shape[1]) + 0.5, np.arange(heat.shape[0]) + 0.5
        inside = ((rws[:, None] >= b.y) & (rws[:, None] <= b.y + b.h)
                  & (cols >= b.x) & (cols <= b.x + b.w))
        hot = heat >= 0.5 * heat.max()
        assert row.hit == bool(inside.flat[np.argmax(heat)])
        assert row.iou == pytest.approx((hot & inside).sum() / (hot | inside).sum(), abs=2e-3)
    md = localize.markdown(rows, 0.5)
    assert "| Pneumonia | 1 |" in md and "| Nodule | 1 |" in md
    localize.write_csv(str(tmp_path / "l.csv"), rows)
    assert list(csv.reader(open(tmp_path / "l.csv")))[0][:4] == ["Image Index", "finding",
                                                                 "hit", "iou"]
    assert CLASS_NAMES.index("Nodule") == CLASS_INDEX["Nodule"]


def test_bad_new_flags_are_one_line_errors(tmp_path):
    from chexnet.config import ChexnetConfig, validate
    from hooks.errors import ConfigError

    base = dict(mode="evaluate", predictions_csv=str(BOXES), report_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"--cam_threshold must be in \(0, 1\], got 1.5"):
        validate(ChexnetConfig(cam_threshold=1.5, **base))
    with pytest.raises(ConfigError, match="--bootstrap_resamples must be >= 0"):
        validate(ChexnetConfig(bootstrap_resamples=-1, **base))
    with pytest.raises(ConfigError, match="--boxes_csv needs a model"):
        validate(ChexnetConfig(boxes_csv=str(BOXES), **base))
    with pytest.raises(ConfigError, match="--boxes_csv=.*nope.csv does not exist"):
        validate(ChexnetConfig(mode="predict", checkpoint=str(tmp_path),
                               boxes_csv=str(tmp_path / "nope.csv")))
