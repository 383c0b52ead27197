"""`python -m chexnet`'s configuration and its cheap checks (they run before Horovod starts).

`ChexnetConfig`'s defaults are the flags' defaults: chexnet/__main__.py defines each flag
with the field's default and fills the config by field name (`flags.fill`).
"""

from __future__ import annotations

import dataclasses
import os

from chexnet.backbones import parse_backbone
from hooks import settings
from hooks.errors import ConfigError
from imagenet.config import check_vgg16_input

COMMANDS = ("train", "evaluate", "predict", "export")
OPTIMIZERS = ("adam", "sgd")
EVAL_SPLITS = ("val", "test", "all")
ON_CORRUPT = ("fail", "skip")
IMAGE_VIEWS = ("whole", "crop")
IMAGENET_WEIGHTS = "imagenet"  # --weights_file value: Keras's published ImageNet weights
# Learning-rate rule when --learning_rate is not given (chexnet.train.peak_learning_rate):
# Adam: CheXNet's 1e-3 (Rajpurkar et al. 2017: Adam, beta 0.9/0.999, lr 0.001, batch 16);
# SGD: the rate recorded in the pre-training checkpoint (the 2018 slides' advice, an SGD
# rule), else the linear-scaling rule 0.1 * global_batch / 256 (Goyal et al. 2017).
ADAM_LEARNING_RATE = 1e-3
SGD_BASE_LEARNING_RATE = 0.1  # per 256 images
# Adam moves every weight by about lr per step whatever the gradient's scale: rates outside
# this range get a warning, rates above ADAM_MAX_LEARNING_RATE are refused (an SGD rate).
ADAM_USUAL_RANGE = (1e-5, 3e-3)
ADAM_MAX_LEARNING_RATE = 1e-2


@dataclasses.dataclass(frozen=True)
class ChexnetConfig(settings.Settings):
    mode: str = "train"  # the command, not a flag
    # data
    csv: str | None = None
    image_dir: str | None = None
    split_dir: str | None = None
    train_val_list: str | None = None
    test_list: str | None = None
    split_fractions: tuple = (0.7, 0.1, 0.2)
    split_seed: int = 0
    val_fraction: float = 0.1
    only_present_images: bool = False
    max_images: int | None = None
    on_corrupt: str = "fail"
    cache: str | None = None
    eval_split: str | None = None  # None: "test" for evaluate, "val" while training
    # model
    backbone: str = "densenet121"
    image_size: int = 224
    pretrained_model_dir: str | None = None
    init_checkpoint: str = "best"
    weights_file: str | None = None
    allow_random_init: bool = False
    image_view: str = "whole"
    weight_decay: float = 0.0
    # training
    train_batch_size: int = 16  # CheXNet's batch
    eval_batch_size: int = 16
    train_steps: int | None = None
    train_epochs: float | None = None
    learning_rate: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weighted_loss: bool = True
    warmup_epochs: float = 1.0
    plateau_patience: int = 1
    plateau_factor: float = 0.1
    min_learning_rate: float = 1e-6
    steps_per_loop: int | None = None
    bn_stats_images: int = 1024
    keep_checkpoints: int = 3
    log_every_n_steps: int = 10
    # outputs
    report_dir: str | None = None
    checkpoint: str | None = None  # evaluate/predict: chexnet checkpoint folder or model_dir
    predictions_csv: str | None = None  # evaluate: score this file, no model
    bootstrap_resamples: int = 1000  # evaluate: patient bootstrap of the AUROCs (0: none)
    bootstrap_seed: int = 0
    boxes_csv: str | None = None  # evaluate/predict: NIH BBox_List_2017.csv: score Grad-CAM
    cam_threshold: float = 0.5  # localization: the map >= this x its max is "the finding"
    heatmap_dir: str | None = None  # predict: Grad-CAM overlays
    output_csv: str | None = None  # predict: probabilities table
    export_dir: str | None = None  # export: the SavedModel folder to write
    model: str | None = None  # predict: a SavedModel written by export (instead of a checkpoint)

    @property
    def reports_to(self) -> str | None:
        """--report_dir, else MODEL_DIR/report (training's validation report) or, for
        evaluate, MODEL_DIR/report-<split> (it must not overwrite training's)."""
        if self.report_dir:
            return self.report_dir
        if not self.model_dir:
            return None
        name = f"report-{self.split_to_evaluate}" if self.mode == "evaluate" else "report"
        return os.path.join(self.model_dir, name)

    @property
    def split_to_evaluate(self) -> str:
        return self.eval_split or ("test" if self.mode == "evaluate" else "val")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}={value} is not one of {', '.join(choices)}")


def validate(config: ChexnetConfig) -> None:
    """Cheap checks of everything a user can get wrong, before Horovod or a model starts."""
    if config.mode not in COMMANDS:
        raise ConfigError(f"command must be one of {', '.join(COMMANDS)}, got {config.mode!r}")
    arch = parse_backbone(config.backbone)[0]
    check_vgg16_input(arch, config.image_size, config.weights_file, flag="--backbone")
    _one_of("optimizer", config.optimizer, OPTIMIZERS)
    _one_of("on_corrupt", config.on_corrupt, ON_CORRUPT)
    settings.check(config)
    if config.eval_split is not None:
        _one_of("eval_split", config.eval_split, EVAL_SPLITS)
    if len(config.split_fractions) != 3:
        raise ConfigError(f"--split_fractions needs 3 values (train,val,test), got "
                          f"{config.split_fractions}")
    _one_of("image_view", config.image_view, IMAGE_VIEWS)
    if config.bootstrap_resamples < 0:
        raise ConfigError(f"--bootstrap_resamples must be >= 0 (0: no intervals), got "
                          f"{config.bootstrap_resamples}")
    if not 0 < config.cam_threshold <= 1:
        raise ConfigError(f"--cam_threshold must be in (0, 1], got {config.cam_threshold}")
    if config.boxes_csv and config.predictions_csv:
        raise ConfigError("--boxes_csv needs a model (Grad-CAM); --predictions_csv has none")
    for name in ("csv", "weights_file", "predictions_csv", "boxes_csv"):
        path = getattr(config, name)
        if path and path != IMAGENET_WEIGHTS and not os.path.isfile(path):
            raise ConfigError(f"--{name}={path} does not exist")
    for name in ("image_dir", "split_dir"):
        path = getattr(config, name)
        if path and not os.path.isdir(path):
            raise ConfigError(f"--{name}={path} is not a directory")
    if config.cache not in (None, "memory"):
        from chexnet import image_cache

        image_cache.check_root(config.cache)
    if config.mode == "train":
        _validate_train(config)
    elif config.mode == "evaluate":
        if not config.predictions_csv and not config.image_dir:
            raise ConfigError("--image_dir is required for evaluate (or --predictions_csv to "
                              "score a file)")
        if not config.predictions_csv and not (config.checkpoint or config.model_dir):
            raise ConfigError("evaluate needs --checkpoint or --model_dir with a chexnet "
                              "checkpoint")
    elif config.mode == "export":
        if not config.export_dir or not (config.checkpoint or config.model_dir):
            raise ConfigError("export needs --checkpoint (a chexnet ckpt-* folder or "
                              "model_dir) and --export_dir")
        return
    else:
        _validate_predict(config)
        return
    if (config.mode == "train" or not config.predictions_csv) and not config.reports_to:
        raise ConfigError("--model_dir or --report_dir is required")
    from hooks.state import checkpoints  # imports Keras: only when it is needed

    checkpoints.check_model_dir(config.model_dir, writable=config.mode == "train")
    checkpoints.check_model_dir(config.report_dir, writable=True, flag="--report_dir")


def _validate_predict(config: ChexnetConfig) -> None:
    if config.model:
        if config.checkpoint:
            raise ConfigError("give --model (an export) or --checkpoint, not both")
        if config.heatmap_dir or config.boxes_csv:
            raise ConfigError("--heatmap_dir and --boxes_csv need Grad-CAM, so a checkpoint "
                              "(--checkpoint), not an export (--model)")
        if not os.path.isfile(os.path.join(config.model, "saved_model.pb")):
            raise ConfigError(f"--model={config.model} is not a SavedModel folder (no "
                              "saved_model.pb; write one with `python -m chexnet export`)")
    elif not (config.checkpoint or config.model_dir):
        raise ConfigError("predict needs --checkpoint (a chexnet ckpt-* folder or "
                          "model_dir) or --model (an export)")


def _validate_train(config: ChexnetConfig) -> None:
    from hooks.training import steps

    if not config.image_dir:
        raise ConfigError("--image_dir is required for train")
    steps.run_steps(config.train_steps, config.train_epochs, 1.0)  # the one rule, no default
    if config.init_checkpoint not in ("best", "latest") and not config.pretrained_model_dir \
            and not os.path.isdir(config.init_checkpoint):
        raise ConfigError(f"--init_checkpoint={config.init_checkpoint} is not a checkpoint "
                          "folder")
    check_init(config)
    check_learning_rate(config)
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.bn_stats_images < 0:
        raise ConfigError(f"--bn_stats_images must be >= 0, got {config.bn_stats_images}")


def starts_from_weights(config: ChexnetConfig) -> bool:
    """Whether the backbone gets pre-trained weights (a checkpoint or a weights file)."""
    return bool(config.pretrained_model_dir or config.weights_file
                or config.init_checkpoint not in ("best", "latest"))


def check_init(config: ChexnetConfig) -> None:
    """ConfigError for an initialisation that cannot be what the user meant: two sources,
    ImageNet weights Keras does not publish for the backbone, or (silently) random weights."""
    if config.pretrained_model_dir and config.weights_file:
        raise ConfigError("give --pretrained_model_dir or --weights_file, not both")
    if config.weights_file and parse_backbone(config.backbone)[0] == "resnet":
        raise ConfigError(f"--weights_file applies to densenet121/vgg16/vgg16_pooled; "
                          f"--backbone={config.backbone} starts from a resnet_main checkpoint "
                          "(--pretrained_model_dir)")
    if not starts_from_weights(config) and not config.allow_random_init:
        raise ConfigError("neither --pretrained_model_dir nor --weights_file is given, so the "
                          "backbone would start from random weights (CheXNet starts from "
                          "ImageNet weights): pass one of them, --weights_file=imagenet, or "
                          "--allow_random_init")


def check_learning_rate(config: ChexnetConfig) -> None:
    lr = config.learning_rate
    if lr is None:
        return
    if lr <= 0:
        raise ConfigError(f"--learning_rate must be > 0, got {lr}")
    if config.optimizer == "adam" and lr > ADAM_MAX_LEARNING_RATE:
        raise ConfigError(f"--learning_rate={lr:g} is far above Adam's usual "
                          f"{ADAM_USUAL_RANGE[0]:g}..{ADAM_USUAL_RANGE[1]:g} (CheXNet: "
                          f"{ADAM_LEARNING_RATE:g}); an SGD rate? pass --optimizer=sgd, or a "
                          f"rate <= {ADAM_MAX_LEARNING_RATE:g}")


def learning_rate_warning(optimizer: str, lr: float) -> str | None:
    """A warning for an Adam rate outside its usual range (None when it is inside)."""
    low, high = ADAM_USUAL_RANGE
    if optimizer != "adam" or low <= lr <= high:
        return None
    return (f"Adam learning rate {lr:g} is outside its usual range {low:g}..{high:g} "
            f"(CheXNet used {ADAM_LEARNING_RATE:g} at batch 16)")
