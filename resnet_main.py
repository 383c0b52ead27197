"""Train and evaluate ResNet (and DenseNet-121 / VGG16) on ImageNet with Horovod on CPUs.

Flag for flag a CPU/Horovod version of tensorflow/tpu's models/official/resnet/
resnet_main.py; the 2018 SURFsara/Intel command line runs unchanged:

  mpirun -np 512 -ppn 2 python resnet_main.py --train_batch_size 8192 \
      --train_steps 14075 --num_intra_threads 24 --num_inter_threads 2 --mkl=True \
      --data_dir=/data/imagenet --model_dir /scratch/run1 --use_tpu=False --kmp_blocktime 1

Batch sizes are global. This is the only file that defines resnet_main's flags; the
work is done by imagenet.train.run().
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TF's C++ start-up chatter short

from absl import app
from absl import flags as absl_flags

import flags
from hooks import schedules
from imagenet import models

FLAGS = absl_flags.FLAGS


def define_flags():
    flags.define_base(train_epochs=True)
    flags.define_performance()
    flags.define_distributed()
    flags.define_schedule(base_learning_rate=0.1, weight_decay=1e-4, warmup_epochs=5.0)
    f = absl_flags
    f.DEFINE_enum("architecture", "resnet", models.ARCHITECTURES,
                  "Network: resnet (see --resnet_depth), densenet121 or vgg16.")
    f.DEFINE_integer("resnet_depth", 50, "ResNet depth: 18, 34, 50, 101, 152 or 200.")
    f.DEFINE_integer("image_size", 224, "Input image size in pixels.")
    f.DEFINE_integer("num_label_classes", 1000, "Number of classes.")
    f.DEFINE_integer("num_train_images", 1281167, "Training images (for epochs and LR).")
    f.DEFINE_integer("num_eval_images", 50000, "Validation images (synthetic data only; "
                     "with TFRecords every validation record is evaluated).")
    f.DEFINE_integer("steps_per_eval", 1251, "Global steps between evaluations in "
                     "train_and_eval mode.")
    f.DEFINE_integer("iterations_per_loop", 1251, "Global steps per loop: a checkpoint and "
                     "a TensorBoard point are written at the end of each loop.")
    f.DEFINE_string("lr_schedule", "tpu", "Learning-rate schedule: tpu (warm-up, then x0.1 "
                    "at epochs 30/60/80, peak base_learning_rate * batch/256) or a preset: "
                    + ", ".join(schedules.PRESETS) + ".")
    f.DEFINE_boolean("enable_lars", False, "LARS optimizer with polynomial decay "
                     "(for global batches >= 16K).")
    f.DEFINE_float("poly_rate", 0.0, "Power of the polynomial decay with LARS (0 = 2).")
    f.DEFINE_enum("data_format", "channels_last", ["channels_last", "channels_first"],
                  "Image layout; CPU kernels need channels_last.")
    f.DEFINE_string("export_dir", None, "Write the trained model here as a .keras file.")
    f.DEFINE_boolean("use_tpu", False, "Accepted for command-line compatibility with the "
                     "TPU script; only False is supported (this is the CPU/Horovod version).")
    f.DEFINE_boolean("use_synthetic_data", False, "Train and evaluate on random images.")
    f.DEFINE_string("tfds_data_dir", None, "Read a prepared TFDS imagenet2012 from here "
                    "instead of --data_dir TFRecords.")
    f.DEFINE_integer("keep_checkpoints", 5, "Newest checkpoints kept (plus the best).")
    f.DEFINE_integer("log_every_n_steps", 100, "Progress line every N global steps.")
    f.DEFINE_float("reference_images_per_sec", None, "Images/s of a 1-rank run; when set, "
                   "the summary reports scaling efficiency against it.")
    f.DEFINE_string("weights_file", None, "Keras weights file for densenet121/vgg16.")
    f.DEFINE_integer("seed", None, "Random seed (initialisation, shuffling, augmentation).")
    f.DEFINE_boolean("json_progress", False, "Also print progress as JSON lines.")
    f.DEFINE_string("snapshot_dir", None, "Where a preset's snapshots (end of each "
                    "collapse) go; default MODEL_DIR/snapshots.")
    f.DEFINE_boolean("collapsed_ensemble", False, "At the end, evaluate the average of the "
                     "snapshots' predictions (presets with snapshots, e.g. surfsara_4096).")
    f.DEFINE_float("target_top_1", None, "Record wall time and epoch when validation top-1 "
                   "first reaches this value (time to accuracy).")
    f.DEFINE_boolean("stop_at_target", False, "Stop training once --target_top_1 is reached.")

    f.register_validator("use_tpu", lambda v: not v, message="--use_tpu=True is not "
                         "supported: this resnet_main runs on CPUs with Horovod")
    f.register_validator("data_format", lambda v: v == "channels_last",
                         message="--data_format=channels_first is not supported on CPU "
                         "(TensorFlow's CPU pooling kernels need channels_last)")
    f.register_validator("resnet_depth", lambda v: v in models.RESNET_LAYERS,
                         message="--resnet_depth must be one of "
                         f"{sorted(models.RESNET_LAYERS)}")
    for name in ("image_size", "num_label_classes", "num_train_images", "num_eval_images",
                 "steps_per_eval", "iterations_per_loop", "keep_checkpoints",
                 "log_every_n_steps"):
        f.register_validator(name, lambda v: v is not None and v > 0,
                             message=f"--{name} must be > 0")
    f.register_validator("lr_schedule", lambda v: v in ("tpu",) + schedules.PRESETS,
                         message="--lr_schedule must be one of "
                         + ", ".join(("tpu",) + schedules.PRESETS))


def run_config_from_flags():
    from imagenet.train import RunConfig
    base = flags.get_base_config()
    sched = flags.get_schedule_config()
    return RunConfig(
        data_dir=base.data_dir, model_dir=base.model_dir, mode=base.mode,
        architecture=FLAGS.architecture, resnet_depth=FLAGS.resnet_depth,
        image_size=FLAGS.image_size, num_label_classes=FLAGS.num_label_classes,
        train_batch_size=base.train_batch_size, eval_batch_size=base.eval_batch_size,
        train_steps=base.train_steps, train_epochs=base.train_epochs,
        num_train_images=FLAGS.num_train_images, num_eval_images=FLAGS.num_eval_images,
        steps_per_eval=FLAGS.steps_per_eval, iterations_per_loop=FLAGS.iterations_per_loop,
        base_learning_rate=sched.base_learning_rate, momentum=sched.momentum,
        weight_decay=sched.weight_decay, label_smoothing=sched.label_smoothing,
        warmup_epochs=sched.warmup_epochs, lr_schedule=FLAGS.lr_schedule,
        enable_lars=FLAGS.enable_lars, poly_rate=FLAGS.poly_rate,
        precision=FLAGS.precision, use_synthetic_data=FLAGS.use_synthetic_data,
        tfds_data_dir=FLAGS.tfds_data_dir, export_dir=FLAGS.export_dir,
        keep_checkpoints=FLAGS.keep_checkpoints, log_every_n_steps=FLAGS.log_every_n_steps,
        reference_images_per_sec=FLAGS.reference_images_per_sec,
        fp16_allreduce=FLAGS.fp16_allreduce, weights_file=FLAGS.weights_file,
        seed=FLAGS.seed, json_progress=FLAGS.json_progress, snapshot_dir=FLAGS.snapshot_dir,
        collapsed_ensemble=FLAGS.collapsed_ensemble, target_top_1=FLAGS.target_top_1,
        stop_at_target=FLAGS.stop_at_target)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from hooks import horovod_glue, runtime
    from imagenet import train

    runtime.configure(flags.get_performance_config())  # before TF starts its thread pools
    config = run_config_from_flags()
    try:
        train.validate(config)  # cheap checks before Horovod and the model start
        dist = flags.get_distributed_config()
        context = horovod_glue.init(dist.fusion_threshold_mb, dist.cycle_time_ms)
        train.run(config, context)
    except (train.ConfigError, ValueError) as err:
        # A user mistake: one line naming the flag or file, no traceback.
        sys.exit(f"resnet_main: error: {err}")


def run_main():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
