"""ChestX-ray14 tf.data pipelines on generated PNGs (grayscale and RGBA, like the real
files): sharding, padding, corrupt files, cache, preprocessing against Keras."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chexnet import input_pipeline as ip
from hooks.errors import DataError


def _png(path, rng, mode="L"):
    pixels = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    pixels[8:20, 10:30] = 255  # some structure, so crops and resizes differ
    image = Image.fromarray(pixels, "L")
    if mode == "RGBA":
        image = image.convert("RGBA")
    image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def six_images(tmp_path_factory):
    """6 PNG paths (the last one RGBA) and distinct one-hot label rows to trace them."""
    folder = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    paths = [_png(folder / f"0000000{i}_000.png", rng, "RGBA" if i == 5 else "L")
             for i in range(6)]
    return paths, np.eye(14, dtype=np.float32)[:6]


def _options(**kw):
    return ip.InputOptions(image_size=kw.pop("image_size", 32), **kw)


def test_missing_image_raises_before_pipeline(six_images, tmp_path):
    paths, labels = six_images
    absent = str(tmp_path / "00099999_000.png")
    with pytest.raises(DataError, match="00099999_000.png"):
        ip.eval_dataset(paths[:2] + [absent], labels[:3], _options(), batch_size=2)


def test_corrupt_png_skip_and_fail(six_images, tmp_path):
    paths, labels = six_images
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files = [paths[0], str(corrupt), paths[1]]
    ds, info = ip.eval_dataset(files, labels[:3], _options(on_corrupt="skip"), batch_size=8)
    assert info.skipped == (str(corrupt),) and info.num_examples == 2
    (x, y, w), *rest = list(ds)
    assert not rest and x.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(w.numpy(), [1, 0, 1])  # the corrupt one's slot counts 0
    np.testing.assert_array_equal(y.numpy(), labels[:3])
    with pytest.raises(DataError, match=r"x\.png"):
        ip.eval_dataset(files, labels[:3], _options(on_corrupt="fail"), batch_size=8)


def test_unverified_corrupt_png_in_training(six_images, tmp_path):
    """verify=False: no pre-scan; TF fails on the file ("fail") or drops it ("skip")."""
    import tensorflow as tf

    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    files, labels = [str(corrupt), six_images[0][0]], six_images[1][:2]
    ds, _ = ip.train_dataset(files, labels, _options(verify=False), batch_size=2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(iter(ds))
    ds, _ = ip.train_dataset(files, labels, _options(verify=False, on_corrupt="skip"),
                             batch_size=2)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(y.numpy(), labels[[1, 1]])  # only the good one repeats


def test_cache_gives_same_batches(six_images, tmp_path):
    paths, labels = six_images[0][:2], six_images[1][:2]
    plain = next(iter(ip.eval_dataset(paths, labels, _options(), batch_size=2)[0]))[0].numpy()
    for cache in ("memory", str(tmp_path / "cache" / "eval")):
        ds, _ = ip.eval_dataset(paths, labels, _options(cache=cache), batch_size=2)
        for _ in range(2):  # a full pass fills the cache, the second reads it back
            (x, _, _), = list(ds)
            np.testing.assert_array_equal(x.numpy(), plain)
    assert len(list((tmp_path / "cache" / "eval").glob("eval-32px-whole-rank0-of-1-*/"
                                                        "images.index"))) == 1


def test_training_batches(six_images):
    paths, labels = six_images
    ds, info = ip.train_dataset(paths, labels, _options(view="crop"), batch_size=4, seed=7)
    assert info.num_examples == 6
    batches = [(x.numpy(), y.numpy()) for x, y in ds.take(3)]  # repeats past the 6 images
    for x, y in batches:
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.shape == (4, 14)
        assert -2.2 < x.min() < x.max() < 2.7  # torch-normalised range
    seen = np.concatenate([y for _, y in batches])[:6]  # first epoch: each image once
    np.testing.assert_array_equal(seen.sum(0), labels.sum(0))
    again = next(iter(ip.train_dataset(paths, labels, _options(view="crop"), batch_size=4,
                                       seed=7)[0]))
    np.testing.assert_array_equal(again[0].numpy(), batches[0][0])  # reproducible


def test_pipeline_batches_do_not_depend_on_what_other_iterators_consumed(six_images):
    """The batch-norm statistics pass makes a new iterator at every evaluation while the
    training iterator runs (and prefetches) ahead: its batches must not depend on that.
    (tf.data's reshuffle_each_iteration would make them: iterators share its seed
    generator; the epochs here are keyed by their number.) reshuffle=False repeats the
    first epoch's order; reshuffling gives each epoch another."""
    paths, labels = six_images

    def labels_of(ds, batches=3, skip=0):
        return np.concatenate([y.numpy() for _, y in ds.skip(skip).take(batches)]
                              ).argmax(1).tolist()

    for reshuffle in (False, True):
        ds, _ = ip.train_dataset(paths, labels, _options(), batch_size=2, seed=5,
                                 reshuffle=reshuffle)
        before = labels_of(ds)
        busy = iter(ds)
        for _ in range(9):  # three epochs on another iterator
            next(busy)
        assert labels_of(ds) == before and sorted(before) == list(range(6))
        second_epoch = labels_of(ds, skip=3)
        assert (second_epoch == before) == (not reshuffle), (reshuffle, before, second_epoch)


@pytest.mark.parametrize("size", [3, 4])
def test_eval_shards_cover_each_image_once_with_padding(six_images, size):
    paths, labels = six_images
    total, counts = np.zeros(14), []
    for rank in range(size):
        ds, info = ip.eval_dataset(paths, labels, _options(), batch_size=4, rank=rank,
                                   size=size)
        elements = [(x.numpy(), y.numpy(), w.numpy()) for x, y, w in ds]
        assert all(x.shape[1:] == (32, 32, 3) and x.dtype == np.float32 for x, _, _ in elements)
        counts.append(sum(len(w) for _, _, w in elements))
        total += sum((y * w[:, None]).sum(0) for _, y, w in elements)
        assert info.num_examples + info.num_padded == -(-6 // size)
    assert counts == [-(-6 // size)] * size  # every rank runs the same number of slots
    np.testing.assert_array_equal(total, labels.sum(0))  # each image exactly once


def test_rgba_decodes_like_grayscale(six_images, tmp_path):
    rgba = six_images[0][5]
    with Image.open(rgba) as image:
        assert image.mode == "RGBA"
        image.convert("L").save(tmp_path / "gray.png")
    ds, _ = ip.eval_dataset([rgba, str(tmp_path / "gray.png")], np.zeros((2, 14)),
                            _options(preprocessing="none"), batch_size=2)
    x = next(iter(ds))[0].numpy()
    np.testing.assert_array_equal(x[0], x[1])
    assert 0 <= x.min() and x.max() <= 255 and x.std() > 10  # a real picture, not blank


def test_eval_image_crop_view_is_resize_then_centre_crop():
    """The ImageNet-style view (an option), against PIL's own resize + crop."""
    image = np.random.default_rng(1).integers(0, 256, (80, 64, 3), dtype=np.uint8)
    out = ip.eval_image(image, _options(image_size=28, view="crop")).numpy()  # resize_to 32
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.fromarray(image).resize((32, 40), Image.BILINEAR))
    crop = reference[6:34, 2:30].astype(float)
    assert np.abs(out.astype(float) - crop).mean() < 12  # antialias filters differ slightly


def test_whole_view_keeps_the_borders_and_only_flips(six_images):
    """Default view (CheXNet): the whole image resized, nothing cropped; in training the
    only augmentation is a horizontal flip of exactly that image."""
    path = six_images[0][0]
    pixels = np.asarray(Image.open(path).convert("RGB"))  # 48 x 40, bright band at 8:20
    out = ip.eval_image(pixels, _options(image_size=20)).numpy()
    reference = np.asarray(Image.fromarray(pixels).resize((20, 20), Image.BILINEAR), float)
    assert out.shape == (20, 20, 3) and np.abs(out - reference).mean() < 12
    # The corners survive (a crop view would drop them): rows 0 and 19 are not the band.
    assert out[:3, :, 0].mean() < 200 and out[3:8, 5:15, 0].mean() > 200
    options = _options(image_size=20, preprocessing="none")
    expected = ip.eval_image(pixels, options).numpy().astype(np.float32)
    ds, _ = ip.train_dataset([path], np.zeros((1, 14)), options, batch_size=1, seed=3)
    views = [x.numpy()[0] for x, _ in ds.take(12)]
    flipped = [np.array_equal(v, expected[:, ::-1]) for v in views]
    assert all(f or np.array_equal(v, expected) for f, v in zip(flipped, views))
    assert 0 < sum(flipped) < len(views)  # both orientations occur


def test_sixteen_bit_png_decodes_to_its_high_byte(tmp_path):
    """16-bit PNGs (as DICOM exports often are) keep their contrast: value >> 8, where PIL's
    convert("RGB") clips everything above 255 to white."""
    values = np.random.default_rng(2).integers(0, 65536, (24, 20), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "x16.png")
    import tensorflow as tf

    decoded = ip.decode(tf.io.read_file(str(tmp_path / "x16.png"))).numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == (24, 20, 3)
    np.testing.assert_array_equal(decoded[..., 1], (values >> 8).astype(np.uint8))
    clipped = np.asarray(Image.open(tmp_path / "x16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # the bug predict had


@pytest.mark.parametrize("mode,module", [("torch", "densenet"), ("caffe", "resnet50"),
                                         ("caffe", "vgg16"), ("tf", "mobilenet")])
def test_preprocessing_matches_keras_applications(mode, module):
    import importlib

    keras_module = importlib.import_module(f"keras.applications.{module}")
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = keras_module.preprocess_input(x.copy())
    np.testing.assert_allclose(ip.preprocess_images(x, mode).numpy(), expected, rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        ip.preprocess_images(x, "inception")


@pytest.mark.parametrize("view", ["whole", "crop"])
def test_predict_feeds_exactly_what_evaluation_feeds(six_images, tmp_path, view):
    """`predict` reads and prepares an image with the evaluation pipeline's own functions:
    the same float input, bit for bit, for 8-bit, RGBA and 16-bit PNGs."""
    from chexnet import predict

    paths = [six_images[0][0], six_images[0][5]]
    pixels = np.asarray(Image.open(paths[0]).convert("L"), np.uint16)
    Image.fromarray(pixels * 257).save(tmp_path / "x16.png")
    paths.append(str(tmp_path / "x16.png"))
    options = _options(image_size=24, view=view)
    (batch, _, _), = list(ip.eval_dataset(paths, np.zeros((3, 14)), options, batch_size=3)[0])
    for path, expected in zip(paths, batch.numpy()):
        np.testing.assert_array_equal(predict.prepare(predict.read_image(path), options)[0],
                                      expected)
    np.testing.assert_array_equal(batch[2].numpy(), batch[0].numpy())  # 16-bit == 8-bit
