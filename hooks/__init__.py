"""Shared training machinery: Horovod glue, LR schedules, Keras callbacks, checkpoints.

Submodules are imported explicitly (``from hooks import horovod_glue``) so that importing
the package does no TensorFlow or Horovod work.
"""
