"""The ChestX-ray14 label space: one class-order constant and the findings encoder.

Every module takes class order from ``CLASS_NAMES`` (a public Dell EMC table once
swapped Pneumonia and Pneumothorax); the tests check it against the NIH CSV through
the labelled split lists.
"""

from __future__ import annotations

import numpy as np

# Order of the 14 columns in the CheXNet split lists and of every model output.
CLASS_NAMES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASS_NAMES)
NO_FINDING = "No Finding"
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# Per-class test AUROC of CheXNet (Rajpurkar et al. 2017, arXiv 1711.05225, Table 2).
CHEXNET_PUBLISHED_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}


def encode_findings(text: str) -> np.ndarray:
    """Turn a ``Finding Labels`` cell ("A|B", "No Finding") into a float32 [14] 0/1 vector.

    Raises ValueError naming the first label that is not one of ``CLASS_NAMES``.
    """
    vector = np.zeros(NUM_CLASSES, np.float32)
    text = text.strip()
    if text == NO_FINDING:
        return vector
    for label in text.split("|"):
        label = label.strip()
        index = CLASS_INDEX.get(label)
        if index is None:
            raise ValueError(
                f"unknown finding label {label!r} (expected one of "
                f"{', '.join(CLASS_NAMES)} or {NO_FINDING!r})"
            )
        vector[index] = 1.0
    return vector
