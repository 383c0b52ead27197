"""Running on many processes: the one Horovod module for Keras 3 (`horovod_glue`: init,
grouped allreduce, broadcast, exact metrics), elastic training (`elastic`, with the
TensorFlow-free checks of `elastic_launch`) and the per-rank stall `watchdog`.
"""
