"""ImageNet: JPEG-folder -> TPU-style TFRecord builder, input pipelines (TFRecord, TFDS,
synthetic), models, and `train.run`."""
