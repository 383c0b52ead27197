"""A Horovod worker that holds still: after hvd.init() it writes OUT_DIR/ready-<rank> and
waits (at most 600 s) for OUT_DIR/go. With `elastic`, it instead runs an endless elastic
loop of tiny allreduces (Horovod's hvd.elastic.run), writing OUT_DIR/step-<rank> each
step, so that a killed peer makes it reset and re-register with the driver.
Usage: python -m tests.workers.hvd_hold OUT_DIR [elastic]
"""
import sys
import time
from pathlib import Path


def hold(out_dir, hvd):
    hvd.init()
    (out_dir / f"ready-{hvd.rank()}").touch()
    deadline = time.monotonic() + 600
    while not (out_dir / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def spin(out_dir, hvd):
    import tensorflow as tf
    from horovod.common.elastic import ObjectState
    hvd.init()
    state = ObjectState(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, step=0)

    @hvd.elastic.run
    def loop(state):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            hvd.allreduce(tf.constant(1.0), name="spin")
            (out_dir / f"step-{hvd.rank()}").touch()
            state.step += 1
            state.commit()
            time.sleep(0.1)
    loop(state)


if __name__ == "__main__":
    import horovod.tensorflow as hvd
    (spin if sys.argv[2:] == ["elastic"] else hold)(Path(sys.argv[1]), hvd)
