"""Exercise the cycle time and tensor-fusion threshold Horovod uses, on a first init and after
hvd.shutdown() + hvd.init() in the same process (what every elastic reset does).

One process, Horovod's single-process Gloo controller. For each init i it prints `INIT i`
to stdout (where Horovod's own log goes) and then:
- prints `PARAMS {"init": i, "cycle_ms": ...}`: the median wall time of one tiny allreduce
  after another; an op waits for the background thread's next cycle, so this is about
  the cycle time (HOROVOD_CYCLE_TIME);
- runs a grouped allreduce of TENSORS float32 tensors of TENSOR_BYTES each. Horovod fuses a
  group by the threshold alone (horovod/common/controller.cc, FuseResponses: it adds
  tensors while their total stays at most the threshold), and with HOROVOD_LOG_LEVEL=trace
  logs each fused response's size ("Created response of size N"), which the test reads.
Usage: python -m tests.workers.hvd_params INITS
"""
import json
import os
import statistics
import sys
import time

TENSORS, TENSOR_BYTES = 3, 1536 * 1024


def cycle_ms(hvd, tf, ops=30):
    x = tf.constant([1.0])
    hvd.allreduce(x, name="warm")
    times = []
    for i in range(ops):
        start = time.perf_counter()
        hvd.allreduce(x, name=f"tick{i}")
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(inits):
    os.environ.setdefault("HOROVOD_CONTROLLER", "gloo")
    os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "gloo")
    import horovod.tensorflow as hvd
    import tensorflow as tf
    group = [tf.fill([TENSOR_BYTES // 4], float(i)) for i in range(TENSORS)]
    for i in range(inits):
        print(f"INIT {i}", flush=True)
        hvd.init()
        print("PARAMS " + json.dumps({"init": i, "cycle_ms": cycle_ms(hvd, tf)}), flush=True)
        hvd.grouped_allreduce(group, name="fusiontest")
        hvd.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
