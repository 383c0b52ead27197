"""resnet_main's run configuration and its cheap checks (they run before Horovod starts).

`RunConfig`'s defaults are the flags' defaults: resnet_main.py defines each flag with the
field's default and fills the config by field name (`flags.fill`).
"""
import dataclasses
import glob
import os

from hooks import settings
from hooks.errors import ConfigError
from hooks.practices import recipes
from hooks.training.steps import run_steps

ARCHITECTURES = ("resnet", "densenet121", "vgg16", "vgg16_pooled")
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
DEFAULT_EPOCHS = 90.0  # the TPU reference's run length when neither length flag is given
# --lr_schedule values: "tpu" (today's reference: milestones follow the run length) and
# "tpu_2018" (fixed epochs 5/30/60/80) are driven by --base_learning_rate / --warmup_epochs;
# the other recipes of hooks.practices.recipes (Keras-free, so a flag error comes before
# TensorFlow's start-up) bring their own values (see hooks.practices.schedules.preset).
PRESET_NAMES = tuple(name for name in recipes.NAMES if name != "tpu")
LR_SCHEDULES = ("tpu", "tpu_2018") + PRESET_NAMES
# The TPU reference reads labels 1..1000 as 0..999, except with 1001 classes, where
# class 0 is a background class and labels are used as they are.
BACKGROUND_CLASSES = 1001


@dataclasses.dataclass(frozen=True)
class RunConfig(settings.Settings):
    data_dir: str | None = None
    mode: str = "train_and_eval"
    architecture: str = "resnet"
    resnet_depth: int = 50
    image_size: int = 224
    num_label_classes: int = 1000
    train_steps: int | None = None
    train_epochs: float | None = None
    num_train_images: int = 1281167
    num_eval_images: int = 50000
    steps_per_eval: int = 1251
    iterations_per_loop: int = 1251
    base_learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    warmup_epochs: float | None = None
    nesterov: bool = True
    lr_schedule: str = "tpu"
    enable_lars: bool = False
    poly_rate: float = 0.0
    use_synthetic_data: bool = False
    tfds_data_dir: str | None = None
    num_parallel_calls: int | None = None
    use_cache: bool = False
    eval_after_training: bool = False
    export_dir: str | None = None
    reference_images_per_sec: float | None = None
    weights_file: str | None = None
    snapshot_dir: str | None = None
    collapsed_ensemble: bool = False
    target_top_1: float | None = None
    stop_at_target: bool = False

    @property
    def steps_per_epoch(self) -> float:
        return self.num_train_images / self.train_batch_size

    @property
    def include_background_label(self) -> bool:
        return self.num_label_classes == BACKGROUND_CLASSES

    @property
    def total_steps(self) -> int:
        return run_steps(self.train_steps, self.train_epochs, self.steps_per_epoch,
                         default_epochs=DEFAULT_EPOCHS)


def _check_tfrecords(data_dir: str, split: str) -> None:
    if not glob.glob(os.path.join(data_dir, f"{split}-*")):
        raise ConfigError(f"--data_dir={data_dir}: no {split}-* TFRecord files")


def check_vgg16_input(architecture: str, image_size: int, weights_file: str | None,
                      flag: str = "--architecture") -> None:
    """ConfigError for an image VGG16 cannot take: under 32 px (five 2x2 poolings), or
    Keras's ImageNet weights for the 2x4096 fc head (fc1 takes 7 x 7 x 512) at other than 224."""
    if architecture not in ("vgg16", "vgg16_pooled"):
        return
    if image_size < 32:
        raise ConfigError(f"--image_size={image_size}: {flag}={architecture} halves the image "
                          "5 times, so it needs 32 px or more")
    if architecture == "vgg16" and weights_file == "imagenet" and image_size != 224:
        raise ConfigError(f"--image_size={image_size}: Keras's ImageNet weights for {flag}="
                          "vgg16 include its fc layers for 224 px images; use "
                          "--image_size=224, or vgg16_pooled")


def validate(config: RunConfig) -> None:
    """Cheap checks of everything a user can get wrong, before Horovod or a model starts."""
    if config.architecture not in ARCHITECTURES:
        raise ConfigError(f"--architecture={config.architecture} is not one of "
                          f"{', '.join(ARCHITECTURES)}")
    if config.architecture == "resnet" and config.resnet_depth not in RESNET_DEPTHS:
        raise ConfigError(f"--resnet_depth={config.resnet_depth} is not one of "
                          f"{list(RESNET_DEPTHS)}")
    check_vgg16_input(config.architecture, config.image_size, config.weights_file)
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr_schedule={config.lr_schedule} is not one of "
                          f"{', '.join(LR_SCHEDULES)}")
    settings.check(config)
    _ = config.total_steps  # raises on --train_steps with --train_epochs
    if config.use_synthetic_data or config.tfds_data_dir:
        pass
    elif not config.data_dir:
        raise ConfigError("--data_dir is required (TFRecords train-*/validation-*), or pass "
                          "--use_synthetic_data or --tfds_data_dir")
    else:
        splits = {"train": ("train",), "eval": ("validation",),
                  "train_and_eval": ("train", "validation")}[config.mode]
        for split in splits:
            _check_tfrecords(config.data_dir, split)
    from hooks.state import checkpoints  # imports Keras: only when it is needed

    checkpoints.check_model_dir(config.model_dir, writable=config.mode != "eval")
    if config.mode == "eval":
        if not checkpoints.latest(config.model_dir):
            raise ConfigError(f"--mode=eval needs a checkpoint in "
                              f"--model_dir={config.model_dir}")
    if config.elastic and config.collapsed_ensemble:
        raise ConfigError("--collapsed_ensemble does not work with --elastic yet (its "
                          "evaluation shards are made once, for the world at start)")
    if config.weights_file and not os.path.isfile(config.weights_file):
        raise ConfigError(f"--weights_file={config.weights_file} does not exist")
    _check_export_dir(config.export_dir)


SAVED_MODEL = "saved_model"  # the SavedModel's folder in --export_dir


def _check_export_dir(export_dir: str | None) -> None:
    """An export is never merged into older files: EXPORT_DIR/saved_model must not exist
    yet (checked before training, not after it)."""
    if not export_dir:
        return
    if os.path.lexists(export_dir) and not os.path.isdir(export_dir):
        raise ConfigError(f"--export_dir={export_dir} is not a directory")
    target = os.path.join(export_dir, SAVED_MODEL)
    if os.path.lexists(target):
        raise ConfigError(f"--export_dir={export_dir}: {target} already exists (an export "
                          "is never merged into an older one): remove it or pick another "
                          "--export_dir")
