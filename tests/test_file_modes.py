"""Issue 20, item 8: checkpoints, reports and heat maps follow the user's umask (POSIX: a new
file gets 0666 & ~umask, a new folder 0777 & ~umask), not tempfile's private 0600/0700."""
import os

import keras
import numpy as np
import pytest

from chexnet import reports
from chexnet.labels import CLASS_NAMES
from hooks.distributed.horovod_glue import Context, write_atomically
from hooks.state import checkpoints


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return oct(os.lstat(path).st_mode & 0o777)


def test_checkpoint_folder_and_files_follow_the_umask(tmp_path, umask):
    inputs = keras.Input((3,))
    net = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="tiny")
    opt = keras.optimizers.SGD(0.1)
    opt.build(net.trainable_variables)
    path = checkpoints.save(str(tmp_path / "run"), 3, net, opt, {})
    assert _mode(path) == oct(0o777 & ~umask)
    for name in (checkpoints.WEIGHTS, checkpoints.OPTIMIZER, checkpoints.STATE):
        assert _mode(os.path.join(path, name)) == oct(0o666 & ~umask), name


def test_reports_and_atomic_writes_follow_the_umask(tmp_path, umask):
    csv_path = tmp_path / "predictions.csv"
    reports.write_predictions_csv(str(csv_path), ["a.png"], np.full((1, len(CLASS_NAMES)), 0.5),
                                  Context())
    heat = tmp_path / "heatmaps" / "a.png"
    write_atomically(str(heat), lambda p: open(p, "wb").write(b"png"), Context())
    for path in (csv_path, heat):
        assert _mode(path) == oct(0o666 & ~umask), path
