"""Issue 20, item 5: a symlink planted in a shared model_dir (or a report folder) is never
followed: the file or folder it points at, outside the tree, stays as it was."""
import os
import time

import keras
import pytest

from hooks.distributed import watchdog
from hooks.distributed.horovod_glue import Context, write_atomically
from hooks.state import checkpoints

SECRET = "outside the model_dir\n"
OLD = 1_000_000_000


@pytest.fixture
def outside(tmp_path):
    """A file and a folder (holding a file) outside model_dir, and the empty model_dir."""
    (tmp_path / "secret.txt").write_text(SECRET)
    os.utime(tmp_path / "secret.txt", (OLD, OLD))  # a touch through a link would change it
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text(SECRET)
    (tmp_path / "run").mkdir()
    return tmp_path


def _unchanged(outside):
    assert (outside / "secret.txt").read_text() == SECRET
    assert os.stat(outside / "secret.txt").st_mtime == OLD
    assert os.listdir(outside / "precious") == ["data.txt"]
    assert (outside / "precious" / "data.txt").read_text() == SECRET


def test_damaged_txt_link_in_a_damaged_checkpoint_is_not_followed(outside):
    damaged = outside / "run" / "ckpt-000000001"
    damaged.mkdir()  # no state.json: damaged
    os.symlink(outside / "secret.txt", damaged / "DAMAGED.txt")
    warnings = []
    with pytest.raises(checkpoints.CheckpointError, match="no usable checkpoint"):
        checkpoints.restore_latest(str(outside / "run"), None, None, warn=warnings.append)
    _unchanged(outside)
    (aside,) = [p for p in (outside / "run").iterdir() if p.name.startswith("damaged-")]
    note = aside / "DAMAGED.txt"
    assert not note.is_symlink() and "state.json" in note.read_text()
    assert len(warnings) == 1 and "moved to" in warnings[0]


def test_links_named_like_checkpoints_or_temps_are_left_alone(outside):
    run = outside / "run"
    planted = {"ckpt-000000009": outside / "precious", ".ckpt-000000009-x": outside / "precious",
               ".tmp-summary.json-x": outside / "secret.txt"}
    for name, target in planted.items():
        os.symlink(target, run / name)
    assert checkpoints.remove_stale_temps(str(run)) == []
    assert checkpoints.list_checkpoints(str(run)) == []
    assert checkpoints.restore_latest(str(run), None, None, warn=pytest.fail) is None
    _unchanged(outside)
    assert sorted(os.listdir(run)) == sorted(planted)  # not moved, not removed


@pytest.mark.parametrize("target", ["precious", "missing"])
def test_save_replaces_a_link_named_like_its_checkpoint(outside, target):
    inputs = keras.Input((3,))
    net = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="tiny")
    run = outside / "run"
    os.symlink(outside / target, run / "ckpt-000000005")
    checkpoints.save(str(run), 5, net, None, {})
    _unchanged(outside)
    assert not (outside / "missing").exists()
    assert not (run / "ckpt-000000005").is_symlink()
    assert [c.step for c in checkpoints.list_checkpoints(str(run))] == [5]


def test_write_atomically_replaces_a_planted_link_not_its_target(outside):
    path = outside / "run" / "auroc.md"
    os.symlink(outside / "secret.txt", path)
    assert write_atomically(str(path), lambda p: open(p, "w").write("report\n"), Context())
    _unchanged(outside)
    assert not path.is_symlink() and path.read_text() == "report\n"


def test_watchdog_does_not_write_through_planted_links(outside):
    stall_dir = outside / "run" / ".stall"
    stall_dir.mkdir()
    os.symlink(outside / "secret.txt", stall_dir / "rank-1")
    os.symlink(outside / "secret.txt", stall_dir / watchdog.CHIEF_ALIVE)
    codes = []
    dog = watchdog.Watchdog(0.3, rank=1, size=2, stall_dir=str(stall_dir), exit=codes.append,
                            poll_s=0.05, grace_s=0.1)
    dog.chief_writing(True)  # touches chief-alive
    dog.chief_writing(False)
    dog.start()
    deadline = time.monotonic() + 20
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert codes == [watchdog.STALL_EXIT_CODE]  # fired, writing rank-1 failed, not followed
    _unchanged(outside)


def test_watchdog_ignores_a_stall_dir_that_is_a_link(outside):
    os.symlink(outside / "precious", outside / "run" / ".stall")
    dog = watchdog.Watchdog(60, rank=0, size=2, stall_dir=str(outside / "run" / ".stall"),
                            exit=lambda code: None)
    dog.start()  # rank 0 would clear the folder: it must not clear `precious`
    dog.chief_writing(True)
    dog.chief_writing(False)
    dog.stop()
    _unchanged(outside)
