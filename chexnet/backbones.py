"""The backbone names `--backbone` takes, Keras-free (the config checks them before
TensorFlow starts; `chexnet.model` builds them)."""
from hooks.errors import UserError
from imagenet.config import RESNET_DEPTHS

BACKBONES_HELP = ("densenet121, resnet50, vgg16 (its 2x4096 fc layers kept), vgg16_pooled "
                  "(or resnet18/34/101/152/200)")
VGG16S = ("vgg16", "vgg16_pooled")


class ModelError(UserError):
    """A backbone name, checkpoint or weights file that cannot be used (one-line message)."""


def parse_backbone(backbone: str) -> tuple[str, int]:
    """'resnet50' -> ('resnet', 50); 'densenet121' -> ('densenet121', 0)."""
    name = backbone.lower()
    if name in ("densenet121", *VGG16S):
        return name, 0
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in RESNET_DEPTHS:
        return "resnet", int(name[6:])
    raise ModelError(f"unknown backbone {backbone!r}; choose one of {BACKBONES_HELP}")
