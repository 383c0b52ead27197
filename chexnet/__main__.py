"""``python -m chexnet train|evaluate|predict|export [IMAGE...] --flags``: ChestX-ray14 fine-tuning.

The only chexnet module that defines flags; it turns them into a ``ChexnetConfig`` and
calls ``chexnet.train.run``, ``chexnet.evaluate.run`` or ``chexnet.predict.run``.
Batch sizes are GLOBAL. Runs under horovodrun / mpirun / srun like resnet_main.py:

  horovodrun -np 2 python -m chexnet train --csv=Data_Entry_2017.csv.gz \\
      --image_dir=images --backbone=resnet50 --pretrained_model_dir=/runs/resnet50 \\
      --init_checkpoint=best --train_batch_size=64 --train_epochs=5 --model_dir=/runs/chexnet
"""

from absl import app
from absl import flags as absl_flags

import flags
from chexnet import config as config_lib
from hooks import entry

FLAGS = absl_flags.FLAGS
ChexnetConfig = config_lib.ChexnetConfig
# chexnet's own flags: name -> help; type and default come from ChexnetConfig's field.
HELP = {
    # data
    "csv": "NIH Data_Entry_2017.csv (2017 or v2020, plain or .gz).",
    "image_dir": "Folder of the PNGs (flat, or the images_001..012/images layout of the NIH "
                 "download).",
    "split_dir": "Folder with the CheXNet lists {train,val,test}_list.txt (file name + 14 "
                 "labels); takes precedence over --csv splits.",
    "train_val_list": "Official NIH train_val_list.txt (with --test_list); validation is a "
                      "patient-wise --val_fraction of it.",
    "test_list": "Official NIH test_list.txt.",
    "split_fractions": "train,val,test image fractions of the patient-wise split used when no "
                       "list is given.",
    "split_seed": "Seed of the patient-wise split.",
    "val_fraction": "Validation share of train_val (official lists).",
    "only_present_images": "Keep only the label rows whose image is in --image_dir (samples, "
                           "demos); otherwise a missing image is an error.",
    "max_images": "Use only the first N images (by name): demos, tests.",
    "on_corrupt": "Undecodable image: fail naming it, or skip it (counted in the log).",
    "cache": "Cache decoded resized images: 'memory', or a folder (made private, 0700; one "
             "of another user or writable by others is refused) holding one subfolder per "
             "pipeline (split, image size, view, rank) keyed by a fingerprint of its files "
             "(path, size, mtime) and labels: a cache of other or changed data is never "
             "read, it is rebuilt (docs/chexnet.md).",
    "eval_split": "Split evaluate scores (default: test; training always validates on val).",
    # model
    "backbone": "densenet121, resnet50, vgg16 (its 2x4096 fc layers kept, as the 2018 "
                "CheXNet VGG16), vgg16_pooled (global average pooling, no fc layers), or "
                "resnet18/34/....",
    "image_size": "Input size in pixels.",
    "image_view": "whole: the whole X-ray resized to image_size x image_size, horizontal flip "
                  "the only augmentation (CheXNet); crop: ImageNet-style, shorter side "
                  "resized to image_size*256/224, random crop (training) or centre crop.",
    "pretrained_model_dir": "resnet_main --model_dir to initialise from.",
    "init_checkpoint": "best (highest recorded validation top_1, not the last), latest, or a "
                       "ckpt-* folder (in --pretrained_model_dir or a path).",
    "weights_file": "Keras application weights (*_notop.h5 for densenet121/vgg16_pooled; "
                    "VGG16's with top for vgg16), or 'imagenet' to download Keras's "
                    "published ImageNet weights (vgg16: 224 px only), instead of a "
                    "resnet_main checkpoint.",
    "allow_random_init": "Allow a backbone with random weights when neither "
                         "--pretrained_model_dir nor --weights_file is given (tests, demos).",
    "weight_decay": "L2 weight decay on the backbone.",
    # training
    "learning_rate": "Peak learning rate; default by --optimizer: adam "
                     f"{config_lib.ADAM_LEARNING_RATE:g} (CheXNet); sgd: the rate recorded "
                     "in the pre-training checkpoint (2018 advice), else "
                     f"{config_lib.SGD_BASE_LEARNING_RATE:g}*train_batch_size/256. Adam "
                     f"rates above {config_lib.ADAM_MAX_LEARNING_RATE:g} are refused.",
    "optimizer": "Optimizer (the default learning rate follows it).",
    "momentum": "SGD momentum.",
    "weighted_loss": "Per-class weighted BCE, w+=N/(P+N), w-=P/(P+N) from the training split.",
    "warmup_epochs": "Warm-up length per 256 images of global batch: warm-up lasts "
                     "warmup_epochs*train_batch_size/256 epochs.",
    "plateau_patience": "Evaluations without lower val loss before decay.",
    "plateau_factor": "LR multiplier on a plateau.",
    "min_learning_rate": "Plateau decay does not go below this.",
    "steps_per_loop": "Global steps between evaluation + checkpoint (default: one epoch).",
    "bn_stats_images": "Before each evaluation and checkpoint, batch-norm moving statistics "
                       "are recomputed from this many training images (average of batch "
                       "statistics, 'precise BN'); 0 keeps the moving averages.",
    # outputs
    "report_dir": "Reports (default: train MODEL_DIR/report, evaluate MODEL_DIR/report-<split>).",
    "checkpoint": "evaluate/predict/export: a chexnet ckpt-* folder or model_dir.",
    "predictions_csv": "evaluate: score this predictions file (Image Index + prob_<Class>) "
                       "against the labels, without a model.",
    "bootstrap_resamples": "evaluate: resamples of the patient-level bootstrap giving a 95% "
                           "interval for each class's AUROC and the mean (0: no intervals).",
    "bootstrap_seed": "evaluate: seed of the bootstrap's patient draws.",
    "boxes_csv": "evaluate/predict: NIH BBox_List_2017.csv(.gz); for the images it boxes, "
                 "score each boxed finding's Grad-CAM (pointing game, IoU) in the original "
                 "image's coordinates, per class with counts; overlays draw the boxes.",
    "cam_threshold": "Localization: the Grad-CAM region is where the map is >= this times "
                     "its maximum (IoU with the box).",
    "heatmap_dir": "predict: write a Grad-CAM overlay PNG per image here.",
    "output_csv": "predict: also write the probabilities table here.",
    "export_dir": "export: write the checkpoint here as a TensorFlow SavedModel taking raw "
                  "uint8/uint16 grey or RGB batches (resizing, view, normalisation in the "
                  "graph) and returning the 14 probabilities; the folder must not exist or be "
                  "empty.",
    "model": "predict: a SavedModel written by `chexnet export`, instead of --checkpoint.",
}


def define_flags(flag_values=FLAGS):
    fv = flag_values
    flags.define_base(ChexnetConfig, fv, data_dir=False, mode=False)
    flags.define_shared(ChexnetConfig, fv)
    flags.define_fields(ChexnetConfig, HELP, fv, enums={
        "on_corrupt": config_lib.ON_CORRUPT, "eval_split": config_lib.EVAL_SPLITS,
        "optimizer": config_lib.OPTIMIZERS, "image_view": config_lib.IMAGE_VIEWS})
    flags.positive(("image_size", "plateau_patience"), fv)
    flags.positive(("max_images", "steps_per_loop"), fv, allow_none=True)
    absl_flags.register_validator("plateau_factor", lambda v: 0 < v <= 1,
                                  message="--plateau_factor must be in (0, 1]", flag_values=fv)
    absl_flags.register_validator("split_fractions", _fractions_ok,
                                  message="--split_fractions must be three numbers "
                                  "(train,val,test)", flag_values=fv)


def _fractions_ok(values) -> bool:
    try:
        return len([float(x) for x in values]) == 3
    except ValueError:
        return False


def config_from_flags(command: str, flag_values=FLAGS) -> ChexnetConfig:
    return flags.fill(ChexnetConfig, flag_values, mode=command,
                      split_fractions=tuple(float(x) for x in flag_values.split_fractions),
                      flags_text=flags.flagfile_text(flag_values,
                                                     f"python -m chexnet {command}"))


def main(argv):
    commands = config_lib.COMMANDS
    if len(argv) < 2 or argv[1] not in commands:
        raise app.UsageError(f"usage: python -m chexnet {{{'|'.join(commands)}}} [IMAGE...] "
                             "--flags")
    command, rest = argv[1], argv[2:]
    if rest and command != "predict":
        raise app.UsageError(f"unexpected arguments: {' '.join(rest)}")
    from chexnet import evaluate, export, predict, train

    run = {"train": train.run, "evaluate": evaluate.run, "export": export.run,
           "predict": lambda config, context: predict.run(config, rest)}[command]
    entry.run_entry(f"chexnet {command}", flags.get_performance_config(),
                    flags.get_distributed_config(), config_from_flags(command),
                    config_lib.validate, run)


def run_main():
    entry.start(define_flags, main)  # nothing above imports TensorFlow


if __name__ == "__main__":
    run_main()
