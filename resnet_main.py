"""Train and evaluate ResNet (and DenseNet-121 / VGG16) on ImageNet with Horovod on CPUs.

Flag for flag a CPU/Horovod version of tensorflow/tpu's models/official/resnet/
resnet_main.py; the 2018 SURFsara/Intel command line runs unchanged:

  mpirun -np 512 -ppn 2 python resnet_main.py --train_batch_size 8192 \
      --train_steps 14075 --num_intra_threads 24 --num_inter_threads 2 --mkl=True \
      --data_dir=/data/imagenet --model_dir /scratch/run1 --use_tpu=False --kmp_blocktime 1

Batch sizes are global. This is the only file that defines resnet_main's flags; the
work is done by imagenet.train.run(). Every flag of the TPU reference is accepted: those
without a CPU meaning are ignored with a warning or refused (flags/tpu_compat.py).
"""
from absl import app
from absl import flags as absl_flags

import flags
from flags import tpu_compat
from hooks import entry
from imagenet import config as config_lib

FLAGS = absl_flags.FLAGS
RunConfig = config_lib.RunConfig
# Accepted for the TPU command line but not part of the config: ignored with a warning,
# refused unless at their default, or aliases (flags/tpu_compat.py).
COMPAT_FLAGS = tpu_compat.NAMES
# resnet_main's own flags: name -> help; type and default come from RunConfig's field.
HELP = {
    "architecture": "Network: resnet (see --resnet_depth), densenet121, vgg16 (with its "
                    "2x4096 fc layers, as in 2018) or vgg16_pooled (global average pooling "
                    "+ classifier, no fc layers).",
    "resnet_depth": "ResNet depth: " + ", ".join(map(str, config_lib.RESNET_DEPTHS)) + ".",
    "image_size": "Input image size in pixels.",
    "num_label_classes": "Number of classes. Records hold labels 1..N and are read as 0..N-1; "
                         "with 1001 (the reference's background-class convention) they are "
                         "used as they are (class 0 = background).",
    "num_train_images": "Training images (for epochs and LR).",
    "num_eval_images": "Validation images (synthetic data only; with TFRecords every "
                       "validation record is evaluated).",
    "steps_per_eval": "Global steps between evaluations in train_and_eval mode.",
    "iterations_per_loop": "Global steps per loop: a checkpoint and a TensorBoard point are "
                           "written at the end of each loop.",
    "lr_schedule": "Learning-rate schedule: tpu (today's reference: peak base_learning_rate * "
                   "batch/256 after a warm-up from 0, x0.1/x0.01/x0.001 at epochs 30/60/80 of "
                   "90 stretched to the run length and floored to whole epochs), tpu_2018 "
                   "(the same at fixed epochs 5/30/60/80), or a preset with its own values: "
                   + ", ".join(s for s in config_lib.LR_SCHEDULES if not s.startswith("tpu"))
                   + ".",
    "enable_lars": "LARS optimizer with the reference's lars_util.py schedule (for global "
                   "batches >= 16K): linear warm-up from 0 to the peak (--poly_rate), then "
                   "power-2 polynomial decay to the end of the run; --base_learning_rate "
                   "and --lr_schedule are not used.",
    "poly_rate": "Peak learning rate with --enable_lars, as the reference; 0 = chosen by "
                 "global batch: 10 below 16K, 25 below 32K, 32 below 64K, else 35.6.",
    "export_dir": "Write the trained model here: NAME.keras (Keras) and saved_model/ (a "
                  "TensorFlow SavedModel, signature serve: normalised images -> logits).",
    "use_synthetic_data": "Train and evaluate on random images.",
    "tfds_data_dir": "Read a prepared TFDS imagenet2012 from here instead of --data_dir "
                     "TFRecords.",
    "num_parallel_calls": "Parallel parse/preprocess calls of the input pipeline per rank; "
                          "unset = tf.data AUTOTUNE.",
    "use_cache": "Keep this rank's raw training records in memory after the first epoch "
                 "(the reference's default on TPU hosts; off here: a rank's share of "
                 "ImageNet may not fit).",
    "eval_after_training": "With --mode=train, evaluate once after training.",
    "reference_images_per_sec": "Images/s of a 1-rank run; when set, the summary reports "
                                "scaling efficiency against it.",
    "weights_file": "Keras weights file: *_notop.h5 for densenet121/vgg16_pooled, VGG16's "
                    "with top (at --image_size) for vgg16.",
    "snapshot_dir": "Where a preset's snapshots (end of each collapse) go; default "
                    "MODEL_DIR/snapshots.",
    "collapsed_ensemble": "At the end, evaluate the average of the snapshots' predictions "
                          "(presets with snapshots, e.g. surfsara_4096).",
    "target_top_1": "Record wall time and epoch when validation top-1 first reaches this value "
                    "(time to accuracy).",
    "stop_at_target": "Stop training once --target_top_1 is reached.",
}


def define_flags(flag_values=FLAGS):
    fv = flag_values
    flags.define_base(RunConfig, fv)
    flags.define_shared(RunConfig, fv)
    flags.define_schedule(RunConfig, fv)
    flags.define_fields(RunConfig, HELP, fv, enums={
        "architecture": config_lib.ARCHITECTURES, "lr_schedule": config_lib.LR_SCHEDULES})
    tpu_compat.define(fv)
    f = absl_flags
    f.register_validator("resnet_depth", lambda v: v in config_lib.RESNET_DEPTHS,
                         message=f"--resnet_depth must be one of {list(config_lib.RESNET_DEPTHS)}",
                         flag_values=fv)
    f.register_validator("poly_rate", lambda v: v >= 0, message="--poly_rate must be >= 0",
                         flag_values=fv)
    flags.positive(("image_size", "num_label_classes", "num_train_images", "num_eval_images",
                    "steps_per_eval", "iterations_per_loop"), fv)
    flags.positive(("num_parallel_calls",), fv, allow_none=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    def run(config, context):
        from imagenet import train  # TensorFlow and Keras: after the cheap checks

        return train.run(config, context)

    tpu_compat.warn_ignored("resnet_main", FLAGS)
    flags_text = flags.flagfile_text(FLAGS, "python resnet_main.py", COMPAT_FLAGS)
    config = flags.fill(RunConfig, flags_text=flags_text)
    entry.run_entry("resnet_main", flags.get_performance_config(),
                    flags.get_distributed_config(), config, config_lib.validate, run)


def run_main():
    entry.start(define_flags, main)  # nothing above imports TensorFlow


if __name__ == "__main__":
    run_main()
