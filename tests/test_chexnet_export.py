"""`python -m chexnet export`: the SavedModel, reloaded in a fresh process that imports
nothing of this project, gives `predict`'s probabilities from the checkpoint (1e-5) on
sample X-rays, a 16-bit grey PNG and a non-square RGB PNG; `predict --model` uses it."""

import json
import os
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

from chexnet import export, predict
from chexnet import model as model_lib
from chexnet.config import ChexnetConfig, validate
from hooks.distributed.horovod_glue import Context
from hooks.errors import ConfigError
from hooks.state import checkpoints

from .conftest import python_cmd, run_cmd, shared_data

SAMPLES = ["00000075_000.png", "00000284_000.png", "00001933_000.png", "00013911_000.png"]

RELOAD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from PIL import Image
    import tensorflow as tf
    t0 = time.perf_counter()
    serve = tf.saved_model.load(sys.argv[1]).signatures  # the signatures, by name
    load_s = time.perf_counter() - t0
    out = []
    for path in sys.argv[2:]:
        image = Image.open(path)
        if image.mode in ("I;16", "I"):
            pixels = np.asarray(image).astype(np.uint16)[..., None]
            name = "serve_uint16"
        else:
            pixels = np.asarray(image.convert("RGB") if image.mode != "L" else image)
            pixels = pixels[..., None] if pixels.ndim == 2 else pixels
            name = "serve"
        result = serve[name](tf.constant(pixels[None]))
        out.append(np.asarray(next(iter(result.values())))[0].tolist())
    ours = [m for m in sys.modules if m.split(".")[0] in ("chexnet", "hooks", "imagenet", "flags")]
    print(json.dumps({"probs": out, "load_s": load_s, "project_modules": ours}))
""")


def _checkpoint(model_dir, view):
    keras.utils.set_random_seed(1)
    network, _ = model_lib.build_chexnet_model("resnet18", 64)
    checkpoints.save(str(model_dir), 1, network, None,
                     {"task": "chexnet", "backbone": "resnet18", "image_size": 64,
                      "preprocessing": "torch", "image_view": view})


def _images(tmp_path):
    paths = [str(shared_data("chestxray14", "images", n)) for n in SAMPLES]
    rng = np.random.default_rng(0)
    grey16 = (rng.random((300, 220)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    rgb = (rng.random((180, 260, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert Image.open(tmp_path / "grey16.png").mode in ("I;16", "I")
    return paths + [str(tmp_path / "grey16.png"), str(tmp_path / "rgb.png")]


@pytest.mark.slow  # a subprocess reloads the export
@pytest.mark.parametrize("view", ["whole", "crop"])
def test_export_reloaded_elsewhere_equals_predict(tmp_path, view):
    _checkpoint(tmp_path / "ckpt", view)
    images = _images(tmp_path)
    config = ChexnetConfig(mode="predict", checkpoint=str(tmp_path / "ckpt"))
    expected = predict.run(config, images, log=lambda *a: None)
    out = tmp_path / "export"
    export_config = ChexnetConfig(mode="export", checkpoint=str(tmp_path / "ckpt"),
                                  export_dir=str(out))
    validate(export_config)
    export.run(export_config, Context(), log=lambda *a: None)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    proc = run_cmd(python_cmd(str(script), str(out), *images), timeout=600)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["project_modules"] == []
    assert np.ptp(expected, axis=0).max() > 1e-3  # the images give different answers
    np.testing.assert_allclose(got["probs"], expected, rtol=0, atol=1e-5)
    # predict --model: the export through the project's own reader
    via_model = predict.run(ChexnetConfig(mode="predict", model=str(out)), images,
                            log=lambda *a: None)
    np.testing.assert_allclose(via_model, expected, rtol=0, atol=1e-5)
    meta = json.loads((out / "assets" / "chexnet.json").read_text())
    assert meta["image_view"] == view and meta["image_size"] == 64
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"export {view}: {size / 2**20:.1f} MiB, load {got['load_s']:.2f} s")


def test_export_refuses_a_full_folder_and_bad_predict_flags(tmp_path):
    _checkpoint(tmp_path / "ckpt", "whole")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="--export_dir=.*full exists and is not an empty"):
        export.run(ChexnetConfig(mode="export", checkpoint=str(tmp_path / "ckpt"),
                                 export_dir=str(tmp_path / "full")), Context())
    with pytest.raises(ConfigError, match="export needs --checkpoint"):
        validate(ChexnetConfig(mode="export", checkpoint=str(tmp_path / "ckpt")))
    with pytest.raises(ConfigError, match="--model=.* is not a SavedModel folder"):
        validate(ChexnetConfig(mode="predict", model=str(tmp_path)))
    with pytest.raises(ConfigError, match="need Grad-CAM"):
        validate(ChexnetConfig(mode="predict", model=str(tmp_path), heatmap_dir="h"))
