"""The CheXNet model: a backbone (DenseNet-121, ResNet, VGG16) and a 14-way sigmoid head,
initialised from a resnet_main checkpoint, a Keras weights file, Keras's published ImageNet
weights (``weights_file="imagenet"``), or nothing.

Backbone names: ``densenet121``, ``vgg16``, ``vgg16_pooled``, ``resnet<depth>``
(``resnet50``; ``resnet18`` for tiny tests). DenseNet and ResNet end in global average
pooling. ``vgg16`` keeps VGG16's flatten + fc1 + fc2 (4096 each), as the 2018 CheXNet VGG16
did: the head reads fc2's 4096 features; ``vgg16_pooled`` pools the conv blocks instead.
A resnet_main checkpoint records ``architecture`` ("resnet", "densenet121", "vgg16",
"vgg16_pooled") and ``resnet_depth`` in its state.json; they must match.
"""

from __future__ import annotations

import dataclasses
import os

import keras

from chexnet.backbones import BACKBONES_HELP, VGG16S, ModelError, parse_backbone  # noqa: F401
from chexnet.config import IMAGENET_WEIGHTS
from chexnet.labels import NUM_CLASSES
from hooks.state import checkpoints
from imagenet import models
from imagenet.config import check_vgg16_input

HEAD_NAME = "chexnet_probs"


def preprocessing_for(backbone: str, init_kind: str) -> str:
    """Input normalisation, chosen by where the initial weights came from (the one table).

    A resnet_main checkpoint (any architecture, VGG16 included) was trained on ImageNet
    mean/std-normalised RGB ("torch", `imagenet.input_pipeline`); Keras's DenseNet weights
    expect the same; Keras's VGG16 weights expect "caffe" (BGR minus the mean). Random
    weights get "torch". Recorded in every chexnet checkpoint (`input_options`)."""
    arch, _ = parse_backbone(backbone)
    if init_kind in ("weights_file", "imagenet") and arch in VGG16S:
        return "caffe"
    return "torch"


def input_options(state: dict, **kw):
    """The `InputOptions` a chexnet checkpoint was trained with (its state.json records
    image_size, preprocessing and image_view); `evaluate` and `predict` use exactly these.
    Checkpoints written before they were recorded get the old behaviour (ImageNet crop;
    "caffe" for VGG16)."""
    from chexnet.input_pipeline import InputOptions

    legacy = "caffe" if parse_backbone(state["backbone"])[0] in VGG16S else "torch"
    return InputOptions(int(state["image_size"]), state.get("preprocessing", legacy),
                        view=state.get("image_view", "crop"), **kw)


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where the backbone weights came from (recorded in checkpoints and reports)."""

    kind: str  # "checkpoint" | "weights_file" | "imagenet" | "none"
    path: str | None = None
    learning_rate: float | None = None  # recorded in the pre-training checkpoint
    metrics: dict | None = None

    def describe(self) -> str:
        if self.kind == "checkpoint":
            top1 = (self.metrics or {}).get("top_1")
            return f"resnet_main checkpoint {self.path}" + (
                f" (val top_1 {top1:.4f})" if top1 is not None else ""
            )
        if self.kind == "weights_file":
            return f"Keras weights file {self.path}"
        if self.kind == "imagenet":
            return "Keras's ImageNet weights"
        return "RANDOM initialisation (no pre-trained weights)"


def find_pretrained_checkpoint(model_dir: str, choice: str = "best") -> checkpoints.Checkpoint:
    """The pre-training checkpoint to start from: ``best`` (highest recorded validation
    top_1, the 2018 advice: not the last), ``latest``, or a checkpoint folder path (absolute
    or relative to ``model_dir``)."""
    if choice in ("best", "latest"):
        if not model_dir or not os.path.isdir(model_dir):
            raise ModelError(f"--pretrained_model_dir={model_dir} is not a directory")
        found = (
            checkpoints.best(model_dir, "top_1", "max") if choice == "best" else None
        ) or checkpoints.latest(model_dir)
        if found is None:
            raise ModelError(
                f"--pretrained_model_dir={model_dir} holds no complete ckpt-* checkpoint"
            )
        return found
    path = choice if os.path.isabs(choice) or not model_dir else os.path.join(model_dir, choice)
    if not os.path.isdir(path) and os.path.isdir(choice):
        path = choice
    found = checkpoints.read(path)
    if found is None:
        raise ModelError(
            f"--init_checkpoint={choice}: {path} is not a complete checkpoint folder "
            f"(needs {checkpoints.WEIGHTS} and {checkpoints.STATE})"
        )
    return found


def check_pretrained_compatible(ckpt: checkpoints.Checkpoint, backbone: str) -> None:
    """ModelError unless the checkpoint's recorded architecture/depth equal ``backbone``'s."""
    arch, depth = parse_backbone(backbone)
    state = ckpt.state
    if "architecture" not in state or "num_label_classes" not in state:
        raise ModelError(
            f"{ckpt.path} is not a resnet_main checkpoint "
            "(state.json has no architecture/num_label_classes)"
        )
    theirs = state["architecture"]
    their_depth = int(state.get("resnet_depth", 0)) if theirs == "resnet" else 0
    if theirs != arch or (arch == "resnet" and their_depth != depth):
        desc = f"resnet{their_depth}" if theirs == "resnet" else theirs
        raise ModelError(
            f"checkpoint {ckpt.path} is a {desc}, not a {backbone}: pass --backbone={desc} "
            f"or another --pretrained_model_dir"
        )


def _attach_head(inputs, features, name: str) -> keras.Model:
    probs = keras.layers.Dense(NUM_CLASSES, activation="sigmoid", dtype="float32", name=HEAD_NAME)(
        features
    )
    return keras.Model(inputs, probs, name=name)


def build_chexnet_model(
    backbone: str = "densenet121",
    image_size: int = 224,
    *,
    pretrained: checkpoints.Checkpoint | None = None,
    weights_file: str | None = None,
    weight_decay: float = 0.0,
    fused_bn: bool = True,
    sync_bn: bool = False,
) -> tuple[keras.Model, InitSource]:
    """Backbone features (pooled; vgg16: fc2's) + Dense(14, sigmoid, float32).

    ``pretrained``: a resnet_main checkpoint (from ``find_pretrained_checkpoint``); its
    classifier is rebuilt, loaded, and its features (the input of its ``logits`` layer)
    get the new head. ``weights_file``: Keras application weights (``*_notop.h5`` for
    densenet121/vgg16_pooled; VGG16's with top for vgg16), or ``"imagenet"`` (Keras
    downloads them once to ~/.keras/models; a one-line ModelError where it cannot; vgg16's
    need 224 px). Neither: random initialisation. ``fused_bn`` (default): batch norms
    are `FusedBatchNormalization`; checkpoints written with Keras's layers still load.
    ``sync_bn``: batch statistics over all Horovod ranks (`hooks.distributed.sync_batchnorm`).
    """
    arch, depth = parse_backbone(backbone)
    name = f"chexnet_{backbone.lower()}"
    _check_init(arch, image_size, pretrained, weights_file)
    if pretrained is not None:
        return _from_checkpoint(pretrained, backbone, arch, depth, image_size, weight_decay,
                                name, fused_bn=fused_bn, sync_bn=sync_bn)
    base = _backbone_from_weights(backbone, arch, depth, image_size, weight_decay,
                                  weights_file, fused_bn=fused_bn, sync_bn=sync_bn)
    model = _attach_head(base.input, base.output, name)
    if weights_file == IMAGENET_WEIGHTS:
        return model, InitSource("imagenet", IMAGENET_WEIGHTS)
    if weights_file:
        return model, InitSource("weights_file", weights_file)
    return model, InitSource("none")


def _check_init(arch: str, image_size: int, pretrained, weights_file: str | None) -> None:
    """ModelError for starting weights that cannot be used (before anything is built)."""
    if pretrained is not None and weights_file:
        raise ModelError("give either a pre-training checkpoint or --weights_file, not both")
    if weights_file:
        if arch == "resnet":
            raise ModelError(
                "--weights_file applies to densenet121/vgg16/vgg16_pooled; a ResNet starts "
                "from a resnet_main checkpoint (--pretrained_model_dir)"
            )
        if weights_file != IMAGENET_WEIGHTS and not os.path.isfile(weights_file):
            raise ModelError(f"--weights_file={weights_file} does not exist")
    check_vgg16_input(arch, image_size, weights_file, flag="--backbone")


def _from_checkpoint(pretrained, backbone: str, arch: str, depth, image_size: int,
                     weight_decay: float, name: str, *, fused_bn: bool, sync_bn: bool):
    """(model, InitSource): resnet_main's classifier restored from `pretrained`, its
    features (the input of its `logits` layer) under a new head."""
    check_pretrained_compatible(pretrained, backbone)
    classifier = models.build_classifier(
        arch, int(pretrained.state["num_label_classes"]), image_size, depth or 50, weight_decay,
        fused_bn=fused_bn, sync_bn=sync_bn)
    try:
        checkpoints.restore(pretrained, classifier)
    except checkpoints.CheckpointError as err:
        raise ModelError(str(err)) from None
    model = _attach_head(classifier.input, classifier.get_layer("logits").input, name)
    lr = pretrained.state.get("learning_rate")
    return model, InitSource("checkpoint", pretrained.path,
                             float(lr) if lr is not None else None,
                             dict(pretrained.state.get("metrics") or {}))


def _backbone_from_weights(backbone: str, arch: str, depth, image_size: int,
                           weight_decay: float, weights_file: str | None, *, fused_bn: bool,
                           sync_bn: bool) -> keras.Model:
    """The backbone with Keras application weights (a file, or "imagenet": Keras's
    download), or random ones; a failed load or download is one ModelError line."""
    imagenet = weights_file == IMAGENET_WEIGHTS
    try:
        return models.build_backbone(
            arch, image_size, depth or 50, weight_decay, weights_file or None, fused_bn=fused_bn,
            sync_bn=sync_bn)
    except Exception as err:  # Keras's download raises a bare Exception
        if not imagenet and not isinstance(err, (ValueError, OSError)):
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if imagenet:
            raise ModelError(
                f"--weights_file=imagenet: cannot get Keras's ImageNet weights for {backbone} "
                f"({first}); on a machine without internet, download the *_notop.h5 file "
                "elsewhere and pass --weights_file=PATH"
            ) from None
        raise ModelError(
            f"cannot build {backbone}"
            + (f" from --weights_file={weights_file}" if weights_file else "")
            + f": {first}"
        ) from None


def head_layer(model: keras.Model) -> keras.layers.Layer:
    """The model's last layer, a Dense with a sigmoid: Grad-CAM differentiates its logit."""
    layer = model.layers[-1]
    if not isinstance(layer, keras.layers.Dense) or layer.activation is not \
            keras.activations.sigmoid:
        raise ModelError(f"{model.name} does not end in a sigmoid Dense layer")
    return layer


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer with a 4-D (feature map) output: the Grad-CAM target."""
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4:
            return layer
    raise ModelError(f"{model.name} has no 4-D feature map layer for Grad-CAM")
