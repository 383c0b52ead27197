"""DICOM as a viewer shows it (`chexnet.dicom`): DICOMs written here with known rescale,
window and VOI LUT values against the same windowing in numpy (DICOM PS3.3 C.11.2.1.2),
MONOCHROME1, one-line refusals, and a DICOM of a sample PNG predicting the PNG's
probabilities."""

import keras
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from chexnet import model as model_lib
from chexnet import predict
from chexnet.config import ChexnetConfig
from hooks.errors import DataError
from hooks.state import checkpoints

from .conftest import shared_data


def write_dicom(path, stored, photometric="MONOCHROME2", bits=12, **attrs):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = stored.shape[-2:] if stored.ndim == 3 and "NumberOfFrames" in attrs \
        else stored.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def window_numpy(x, centre, width):
    """PS3.3 C.11.2.1.2.1 linear window to 0..255."""
    lo, hi = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))


def _stored(seed, shape=(40, 50)):
    return np.random.default_rng(seed).integers(0, 4096, shape)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_then_first_window_equals_numpy(tmp_path, photometric):
    stored = _stored(0)
    path = write_dicom(tmp_path / "w.dcm", stored, photometric, RescaleSlope=2,
                       RescaleIntercept=-1024, WindowCenter=[300, 40], WindowWidth=[800, 400])
    expected = window_numpy(stored * 2.0 - 1024, 300, 800)  # the first window
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    got = predict.read_image(path)
    assert got.dtype == np.uint8 and got.shape == (40, 50, 3)
    assert np.array_equal(got[..., 0], got[..., 2])
    np.testing.assert_allclose(got[..., 0], expected, atol=0.5 + 1e-9)
    assert (got[..., 0] == 0).any() and (got[..., 0] == 255).any()  # the window clips


def test_voi_lut_sequence_equals_numpy(tmp_path):
    """A 16-bit gamma LUT (8-bit LUT data is packed two entries a word, a convention
    writers disagree on), first mapped value 500."""
    stored = _stored(1)
    lut = np.round(65535 * (np.arange(1024) / 1023) ** 0.5).astype(int)
    item = Dataset()
    item.LUTDescriptor = [1024, 500, 16]  # entries, first mapped value, bits
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    item["LUTDescriptor"].VR = "US"
    path = write_dicom(tmp_path / "l.dcm", stored, RescaleSlope=1, RescaleIntercept=0,
                       VOILUTSequence=Sequence([item]), WindowCenter=2000, WindowWidth=100)
    expected = lut[np.clip(stored - 500, 0, 1023)] / 65535 * 255  # the LUT wins
    np.testing.assert_allclose(predict.read_image(path)[..., 0], expected, atol=0.5 + 1e-9)
    assert len(np.unique(predict.read_image(path))) > 100


def test_without_voi_the_modality_range_spans_0_255(tmp_path):
    stored = _stored(2)
    path = write_dicom(tmp_path / "n.dcm", stored, RescaleSlope=0.5, RescaleIntercept=10)
    x = stored * 0.5 + 10
    expected = (x - x.min()) / (x.max() - x.min()) * 255
    np.testing.assert_allclose(predict.read_image(path)[..., 0], expected, atol=0.5 + 1e-9)


def test_multi_frame_and_colour_are_refused_in_one_line(tmp_path):
    frames = np.stack([_stored(3), _stored(4)])
    path = write_dicom(tmp_path / "mf.dcm", frames.reshape(80, 50), NumberOfFrames=2)
    with pytest.raises(DataError, match=r"mf.dcm: multi-frame DICOM \(2 frames\)") as err:
        predict.read_image(path)
    assert "\n" not in str(err.value)
    path = write_dicom(tmp_path / "c.dcm", _stored(5), "RGB")
    with pytest.raises(DataError, match=r"c.dcm: colour DICOM \(PhotometricInterpretation RGB"):
        predict.read_image(path)


def test_dicom_of_a_sample_png_predicts_the_pngs_probabilities(tmp_path):
    """Stored = 4 x PNG + 100 (12 bits), rescale 0.25 / -25 gives the PNG's values back, and
    the window C=128, W=256 maps 0..255 onto itself; MONOCHROME1 stores 255 - PNG."""
    png = shared_data("chestxray14", "images", "00000075_000.png")
    grey = np.asarray(Image.open(png).convert("L")).astype(np.int64)
    m2 = write_dicom(tmp_path / "m2.dcm", grey * 4 + 100, RescaleSlope=0.25,
                     RescaleIntercept=-25, WindowCenter=128, WindowWidth=256)
    m1 = write_dicom(tmp_path / "m1.dcm", (255 - grey) * 4 + 100, "MONOCHROME1",
                     RescaleSlope=0.25, RescaleIntercept=-25, WindowCenter=128,
                     WindowWidth=256)
    for path in (m2, m1):
        np.testing.assert_array_equal(predict.read_image(path), predict.read_image(str(png)))
    keras.utils.set_random_seed(2)
    network, _ = model_lib.build_chexnet_model("resnet18", 64)
    checkpoints.save(str(tmp_path / "ckpt"), 1, network, None,
                     {"task": "chexnet", "backbone": "resnet18", "image_size": 64,
                      "preprocessing": "torch", "image_view": "whole"})
    other = shared_data("chestxray14", "images", "00000284_000.png")
    probs = predict.run(ChexnetConfig(mode="predict", checkpoint=str(tmp_path / "ckpt")),
                        [str(png), m2, m1, str(other)], log=lambda *a: None)
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-6)
    np.testing.assert_allclose(probs[2], probs[0], atol=1e-6)
    assert np.abs(probs[3] - probs[0]).max() > 1e-4  # another X-ray: another answer
