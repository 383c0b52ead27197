"""Grad-CAM by value (issue #19): `chexnet.predict.grad_cam` and `upsample` against
Selvaraju et al. 2017 written out in numpy here, on small networks whose gradients have a
closed form, where the map before the ReLU is negative in places (so a Grad-CAM without
its ReLU, or shifted by its minimum, fails). In-process and cheap."""
import keras
import numpy as np
import pytest

from chexnet import predict

H, W, IN_CHANNELS, FILTERS, CLASSES = 6, 7, 2, 4, 3


def _conv_same_relu(x, kernel, bias):
    """ReLU(3x3 'same' convolution) of x [H, W, Cin], zero padding, in float64."""
    padded = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((x.shape[0], x.shape[1], kernel.shape[-1]))
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[r, c] = np.tensordot(padded[r:r + 3, c:c + 3], kernel, axes=3) + bias
    return np.maximum(out, 0.0)


def _network(rng, hidden: int, dtype="float32"):
    """image -> Conv2D 3x3 ReLU (the last 4-D map A, computed in `dtype`) -> global average
    pool -> [Dense ReLU `hidden`] -> Dense sigmoid head, with random weights; returns
    (network, weights)."""
    inputs = keras.Input((H, W, IN_CHANNELS))
    conv = keras.layers.Conv2D(FILTERS, 3, padding="same", activation="relu", dtype=dtype)
    h = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(hidden, activation="relu") if hidden else None
    if dense is not None:
        h = dense(h)
    head = keras.layers.Dense(CLASSES, activation="sigmoid")
    network = keras.Model(inputs, head(h))
    layers = [conv, dense, head] if dense is not None else [conv, head]
    weights = []
    for layer in layers:
        kernel, bias = layer.get_weights()
        values = [rng.normal(size=kernel.shape), rng.normal(scale=0.3, size=bias.shape)]
        layer.set_weights([v.astype(np.float32) for v in values])
        weights.append(values)
    return network, weights


def reference_cam(x, weights, class_index):
    """(Grad-CAM normalised by its maximum, the map before the ReLU). The logit is the
    sigmoid's input; with global average pooling right after A, d logit / d A_c(i, j) =
    (d logit / d pooled_c) / (H W) at every location, so the channel weight alpha_c (the
    spatial mean of the gradient) is that same number."""
    (kernel, bias), *dense = weights
    fmap = _conv_same_relu(x, kernel, bias)  # A [H, W, C]
    pooled = fmap.mean(axis=(0, 1))
    d_pooled = dense[-1][0][:, class_index]  # the head's kernel column
    if len(dense) == 2:  # hidden Dense ReLU: chain rule through it
        (w1, b1), (w2, _) = dense
        d_pooled = w1 @ (w2[:, class_index] * (pooled @ w1 + b1 > 0))
    alpha = d_pooled / (fmap.shape[0] * fmap.shape[1])
    before_relu = fmap @ alpha
    cam = np.maximum(before_relu, 0.0)
    return (cam / cam.max() if cam.max() > 0 else cam), before_relu


def _two_signed(before_relu) -> bool:
    """Whether the map before the ReLU goes beyond 5% of its range on either side of 0."""
    scale = np.abs(before_relu).max()
    return min(-before_relu.min(), before_relu.max()) > 0.05 * scale


@pytest.mark.parametrize("hidden", [0, 8])
def test_grad_cam_is_the_published_formula(hidden):
    rng = np.random.default_rng(hidden)
    network, weights = _network(rng, hidden)
    checked = 0
    for _ in range(20):
        x = rng.normal(size=(H, W, IN_CHANNELS)).astype(np.float32)
        for k in range(CLASSES):
            expected, before_relu = reference_cam(x, weights, k)
            if not _two_signed(before_relu):
                continue  # only there does the ReLU matter
            cam = predict.grad_cam(network, x, k)
            assert cam.shape == (H, W)
            # float32 forward pass and gradients vs float64 here
            np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-5)
            # The tolerance tells the ReLU apart: without it (shifted by the minimum, or
            # just divided by the maximum) the map is far from the formula's.
            shifted = (before_relu - before_relu.min()) / np.ptp(before_relu)
            assert np.abs(shifted - expected).max() > 0.05
            assert np.abs(before_relu / before_relu.max() - expected).max() > 0.05
            checked += 1
    assert checked >= 20, checked  # the seeds give enough two-signed maps


@pytest.mark.parametrize("case", ["bfloat16 map", "frozen"])
def test_grad_cam_of_a_bfloat16_or_frozen_network(case):
    """A network built under --precision=bfloat16 (its map is bfloat16; grad_cam raised on
    it before) or with frozen layers gets the same Grad-CAM, to bfloat16's precision (8
    significant bits: about 0.4% per value; 0.03 of the map's maximum allowed)."""
    rng = np.random.default_rng(11)
    network, weights = _network(rng, 0, "mixed_bfloat16" if case == "bfloat16 map" else
                                "float32")
    if case == "frozen":
        network.trainable = False
    checked = 0
    for x in rng.normal(size=(4, H, W, IN_CHANNELS)).astype(np.float32):
        for k in range(CLASSES):
            expected, before_relu = reference_cam(x, weights, k)
            if _two_signed(before_relu):
                np.testing.assert_allclose(predict.grad_cam(network, x, k), expected,
                                           atol=0.03 if case == "bfloat16 map" else 1e-5,
                                           rtol=1e-4)
                checked += 1
    assert checked >= 4, checked


def test_grad_cam_of_a_saturated_class_uses_the_logit():
    """A probability of 1.0 in float32 (logit about +40) has no gradient left; the logit
    still does, so the map is the formula's (the bias does not enter it)."""
    rng = np.random.default_rng(5)
    network, weights = _network(rng, 0)
    head = network.layers[-1]
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + 40.0])
    x = rng.normal(size=(H, W, IN_CHANNELS)).astype(np.float32)
    assert np.all(network(x[None]).numpy() == 1.0)
    pointing = 0
    for k in range(CLASSES):
        expected, _ = reference_cam(x, weights, k)
        np.testing.assert_allclose(predict.grad_cam(network, x, k), expected, rtol=1e-4,
                                   atol=1e-5)
        pointing += expected.max() == 1.0
    assert pointing >= 2  # maps that are not all zeros


def test_grad_cam_is_zero_where_no_location_raises_the_logit():
    """Documented: all zeros when every location lowers the logit (nothing to normalise)."""
    rng = np.random.default_rng(7)
    network, weights = _network(rng, 0)
    head = network.layers[-1]
    kernel, bias = head.get_weights()
    kernel[:, 0] = -np.abs(kernel[:, 0])  # A >= 0 (ReLU), so every alpha_c A_c <= 0
    head.set_weights([kernel, bias])
    x = rng.normal(size=(H, W, IN_CHANNELS)).astype(np.float32)
    weights[-1][0] = kernel.astype(np.float64)
    expected, before_relu = reference_cam(x, weights, 0)
    assert before_relu.min() < 0 and not expected.any()
    np.testing.assert_array_equal(predict.grad_cam(network, x, 0), np.zeros((H, W)))


def bilinear(image, out_h, out_w):
    """Bilinear resize with half-pixel centres (source coordinate (i + 0.5) * in / out -
    0.5, clamped to the edge samples), the convention of tf.image.resize, in numpy."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    r0, r1, fr = axis(image.shape[0], out_h)
    c0, c1, fc = axis(image.shape[1], out_w)
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def test_upsampled_map_is_bilinear():
    """The overlay colours `upsample(cam)`: the map bilinearly resized to the view."""
    rng = np.random.default_rng(3)
    cam = rng.uniform(size=(4, 5))
    for shape in ((512, 512, 3), (13, 9), (4, 5)):
        np.testing.assert_allclose(predict.upsample(cam, shape),
                                   bilinear(cam, shape[0], shape[1]), rtol=1e-5, atol=1e-6)
