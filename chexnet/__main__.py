"""``python -m chexnet train|evaluate|predict [IMAGE...] --flags``: ChestX-ray14 fine-tuning.

The only chexnet module that defines flags; it turns them into a ``ChexnetConfig`` and
calls ``chexnet.train.run`` (train, evaluate) or ``chexnet.predict.run`` (predict).
Batch sizes are GLOBAL. Runs under horovodrun / mpirun / srun like resnet_main.py:

  horovodrun -np 2 python -m chexnet train --csv=Data_Entry_2017.csv.gz \\
      --image_dir=images --backbone=resnet50 --pretrained_model_dir=/runs/resnet50 \\
      --init_checkpoint=best --train_batch_size=64 --train_epochs=5 --model_dir=/runs/chexnet
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags as absl_flags

import flags

FLAGS = absl_flags.FLAGS
COMMANDS = ("train", "evaluate", "predict")


def define_flags():
    flags.define_base(data_dir=False, mode=False, default_batch_size=16)
    flags.define_performance()
    flags.define_distributed()
    f = absl_flags
    # data
    f.DEFINE_string("csv", None, "NIH Data_Entry_2017.csv (2017 or v2020, plain or .gz).")
    f.DEFINE_string("image_dir", None, "Folder of the PNGs (flat, or the images_001..012/images "
                    "layout of the NIH download).")
    f.DEFINE_string("split_dir", None, "Folder with the CheXNet lists {train,val,test}_list.txt "
                    "(file name + 14 labels); takes precedence over --csv splits.")
    f.DEFINE_string("train_val_list", None, "Official NIH train_val_list.txt (with --test_list); "
                    "validation is a patient-wise --val_fraction of it.")
    f.DEFINE_string("test_list", None, "Official NIH test_list.txt.")
    f.DEFINE_list("split_fractions", ["0.7", "0.1", "0.2"], "train,val,test image fractions of "
                  "the patient-wise split used when no list is given.")
    f.DEFINE_integer("split_seed", 0, "Seed of the patient-wise split.")
    f.DEFINE_float("val_fraction", 0.1, "Validation share of train_val (official lists).")
    f.DEFINE_boolean("only_present_images", False, "Keep only the CSV rows whose image is in "
                     "--image_dir (samples, demos); otherwise a missing image is an error.")
    f.DEFINE_integer("max_images", None, "Use only the first N images (by name): demos, tests.")
    f.DEFINE_enum("on_corrupt", "fail", ["fail", "skip"], "Undecodable image: fail naming it, "
                  "or skip it (counted in the log).")
    f.DEFINE_string("cache", None, "Cache decoded resized images: 'memory' or a file prefix.")
    f.DEFINE_enum("eval_split", None, ["val", "test", "all"], "Split evaluate scores "
                  "(default: test; training always validates on val).")
    # model
    f.DEFINE_string("backbone", "densenet121", "densenet121, resnet50, vgg16 (or resnet18/34/...).")
    f.DEFINE_integer("image_size", 224, "Input size in pixels (images are resized to "
                     "size*256/224, then cropped).")
    f.DEFINE_string("pretrained_model_dir", None, "resnet_main --model_dir to initialise from.")
    f.DEFINE_string("init_checkpoint", "best", "best (highest recorded validation top_1, not the "
                    "last), latest, or a ckpt-* folder (in --pretrained_model_dir or a path).")
    f.DEFINE_string("weights_file", None, "Keras application weights (*_notop.h5) for "
                    "densenet121/vgg16, instead of a resnet_main checkpoint.")
    f.DEFINE_float("weight_decay", 0.0, "L2 weight decay on the backbone.")
    # training
    f.DEFINE_float("learning_rate", None, "Peak learning rate; default: the learning rate "
                   "recorded in the pre-training checkpoint (2018 advice), else 1e-3.")
    f.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer.")
    f.DEFINE_float("momentum", 0.9, "SGD momentum.")
    f.DEFINE_boolean("weighted_loss", True, "Per-class weighted BCE, w+=N/(P+N), w-=P/(P+N) "
                     "from the training split.")
    f.DEFINE_float("warmup_epochs", 1.0, "Warm-up length per 256 images of global batch: "
                   "warm-up lasts warmup_epochs*train_batch_size/256 epochs.")
    f.DEFINE_integer("plateau_patience", 1, "Evaluations without lower val loss before decay.")
    f.DEFINE_float("plateau_factor", 0.1, "LR multiplier on a plateau.")
    f.DEFINE_float("min_learning_rate", 1e-6, "Plateau decay does not go below this.")
    f.DEFINE_integer("steps_per_loop", None, "Global steps between evaluation + checkpoint "
                     "(default: one epoch).")
    f.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints kept (plus the best).")
    f.DEFINE_integer("log_every_n_steps", 10, "Progress line every N global steps.")
    f.DEFINE_integer("seed", None, "Random seed.")
    # outputs
    f.DEFINE_string("report_dir", None, "Reports (default MODEL_DIR/report).")
    f.DEFINE_string("checkpoint", None, "evaluate/predict: a chexnet ckpt-* folder or model_dir.")
    f.DEFINE_string("predictions_csv", None, "evaluate: score this predictions file (Image "
                    "Index + prob_<Class>) against the labels, without a model.")
    f.DEFINE_string("heatmap_dir", None, "predict: write a Grad-CAM overlay PNG per image here.")
    f.DEFINE_string("output_csv", None, "predict: also write the probabilities table here.")
    for name in ("image_size", "keep_checkpoints",
                 "log_every_n_steps", "plateau_patience"):
        f.register_validator(name, lambda v: v is not None and v > 0, message=f"--{name} must be > 0")
    for name in ("max_images", "steps_per_loop"):
        f.register_validator(name, lambda v: v is None or v > 0, message=f"--{name} must be > 0")
    f.register_validator("plateau_factor", lambda v: 0 < v <= 1, message="--plateau_factor must be in (0, 1]")


def config_from_flags(command: str):
    from chexnet.train import ChexnetConfig

    try:
        fractions = tuple(float(x) for x in FLAGS.split_fractions)
    except ValueError:
        raise app.UsageError(f"--split_fractions={','.join(FLAGS.split_fractions)} must be numbers")
    eval_split = FLAGS.eval_split or ("test" if command == "evaluate" else "val")
    return ChexnetConfig(
        mode=command, csv=FLAGS.csv, image_dir=FLAGS.image_dir, split_dir=FLAGS.split_dir,
        train_val_list=FLAGS.train_val_list, test_list=FLAGS.test_list,
        split_fractions=fractions, split_seed=FLAGS.split_seed, val_fraction=FLAGS.val_fraction,
        only_present_images=FLAGS.only_present_images, max_images=FLAGS.max_images,
        on_corrupt=FLAGS.on_corrupt, cache=FLAGS.cache, eval_split=eval_split,
        backbone=FLAGS.backbone, image_size=FLAGS.image_size,
        pretrained_model_dir=FLAGS.pretrained_model_dir, init_checkpoint=FLAGS.init_checkpoint,
        weights_file=FLAGS.weights_file, weight_decay=FLAGS.weight_decay,
        train_batch_size=FLAGS.train_batch_size, eval_batch_size=FLAGS.eval_batch_size,
        train_steps=FLAGS.train_steps, train_epochs=FLAGS.train_epochs,
        learning_rate=FLAGS.learning_rate, optimizer=FLAGS.optimizer, momentum=FLAGS.momentum,
        weighted_loss=FLAGS.weighted_loss, warmup_epochs=FLAGS.warmup_epochs,
        plateau_patience=FLAGS.plateau_patience, plateau_factor=FLAGS.plateau_factor,
        min_learning_rate=FLAGS.min_learning_rate, steps_per_loop=FLAGS.steps_per_loop,
        keep_checkpoints=FLAGS.keep_checkpoints, log_every_n_steps=FLAGS.log_every_n_steps,
        fp16_allreduce=FLAGS.fp16_allreduce, seed=FLAGS.seed, model_dir=FLAGS.model_dir,
        report_dir=FLAGS.report_dir, checkpoint=FLAGS.checkpoint,
        predictions_csv=FLAGS.predictions_csv)


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m chexnet {{{'|'.join(COMMANDS)}}} [IMAGE...] --flags")
    command, rest = argv[1], argv[2:]
    if rest and command != "predict":
        raise app.UsageError(f"unexpected arguments: {' '.join(rest)}")
    from chexnet import predict, train
    from chexnet.data import DataError
    from hooks import checkpoints, horovod_glue, runtime

    runtime.configure(flags.get_performance_config())
    try:
        if command == "predict":
            predict.run(predict.PredictConfig(
                images=tuple(rest), checkpoint=FLAGS.checkpoint or FLAGS.model_dir,
                heatmap_dir=FLAGS.heatmap_dir, output_csv=FLAGS.output_csv))
            return
        config = config_from_flags(command)
        train.validate(config)  # cheap checks before Horovod and the model start
        dist = flags.get_distributed_config()
        context = horovod_glue.init(dist.fusion_threshold_mb, dist.cycle_time_ms)
        train.run(config, context)
    except (train.ConfigError, DataError, checkpoints.CheckpointError, ValueError, OSError) as err:
        # A user mistake: one line naming the flag or file, no traceback.
        sys.exit(f"chexnet {command}: error: {err}")


def run_main():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
