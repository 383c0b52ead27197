"""DICOM X-rays as a viewer shows them, through pydicom's LUTs (DICOM PS3.3 C.11):

stored values -> modality LUT (Modality LUT Sequence, or RescaleSlope/Intercept) -> VOI
(VOI LUT Sequence, else the FIRST window centre/width, with its VOILUTFunction) -> grey
0..255, where 0 and 255 are what the VOI gives the darkest and brightest possible inputs
-> MONOCHROME1 inverted (there, high values are dark). Without a VOI the modality values'
own min..max span 0..255. One 2-D grey frame only: multi-frame and colour DICOMs are
refused in one line, before their pixels are decoded.
"""

from __future__ import annotations

import numpy as np

from hooks.errors import DataError

GREY = ("MONOCHROME1", "MONOCHROME2")


def _check_single_grey(ds, path: str) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames): give one X-ray per file")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in GREY:
        raise DataError(f"{path}: colour DICOM (PhotometricInterpretation {photometric or '?'}, "
                        f"{samples} samples per pixel): only grey X-rays (MONOCHROME1/2)")


def _has_voi(ds) -> bool:
    return bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)


def to_grey(ds, pixels: np.ndarray) -> np.ndarray:
    """float64 0..255 display grey of one stored frame (see the module docstring)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(pixels, ds), np.float64)
    if _has_voi(ds):
        if ds.get("VOILUTSequence"):  # a LUT is indexed by integers
            values = np.round(values).astype(np.int64)
        # What the VOI makes of inputs beyond either end: its black and white.
        ends = np.asarray(apply_voi_lut(np.array([-2**40, 2**40], values.dtype), ds, index=0),
                          np.float64)
        shown = np.asarray(apply_voi_lut(values, ds, index=0), np.float64)
        black, white = float(ends[0]), float(ends[1])
    else:
        shown, black, white = values, float(values.min()), float(values.max())
    if white == black:
        grey = np.zeros_like(shown)
    else:
        grey = np.clip((shown - black) / (white - black), 0.0, 1.0) * 255.0
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        grey = 255.0 - grey
    return grey


def read_dicom(path: str) -> np.ndarray:
    """uint8 [H, W, 3]: the display grey (`to_grey`) rounded, in 3 equal channels.
    DataError, one line naming the file, for what cannot be read or is not one grey frame."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many types
        raise DataError(f"{path}: not a readable DICOM file: {err}") from None
    _check_single_grey(ds, path)
    try:
        pixels = ds.pixel_array
    except Exception as err:
        raise DataError(f"{path}: cannot decode DICOM pixels: {err}") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: DICOM pixel array of shape {pixels.shape} is not one 2-D image")
    try:
        grey = to_grey(ds, pixels)
    except Exception as err:  # a malformed LUT or window
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot apply the DICOM LUTs: {first}") from None
    grey = np.round(grey).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
