"""hooks.plot_schedule: a real PNG for a preset, one-line errors for bad flags."""
import pytest

from hooks import plot_schedule as P
from hooks.practices import schedules as S


def test_writes_a_png_with_the_preset_curves(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert P.main(["--lr_schedule=surfsara_4096", "--global_batch=4096", "--epochs=72",
                   "--steps_per_epoch=20", f"--output={out}"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"wrote {out}" in capsys.readouterr().out
    # The plotted values are the preset's: peak 1.6 after 5 warm-up epochs, wd 2e-4 at the end.
    preset = S.preset("surfsara_4096", global_batch=4096, steps_per_epoch=20, epochs=72)
    epochs, lr, wd = P.curves(preset, 20)
    assert epochs[-1] == 72 and len(epochs) == preset.total_steps + 1
    assert lr[100] == pytest.approx(1.6) and lr.max() == pytest.approx(1.6)
    assert wd[0] == pytest.approx(5e-5) and wd[-1] == pytest.approx(2e-4)


def test_num_train_images_sets_steps_per_epoch(tmp_path):
    args = P.parse_args(["--lr_schedule=goyal", "--global_batch=1000",
                         "--num_train_images=2500", f"--output={tmp_path / 'g.png'}"])
    assert args.steps_per_epoch == 3


@pytest.mark.parametrize("flags, message", [
    (["--lr_schedule=nope", "--global_batch=256"], "--lr_schedule must be one of tpu"),
    (["--lr_schedule=tpu", "--global_batch=0"], "--global_batch must be > 0, got 0"),
    (["--lr_schedule=tpu", "--global_batch=256", "--epochs=-1"], "--epochs must be > 0"),
    (["--lr_schedule=tpu", "--global_batch=256", "--steps_per_epoch=3",
      "--num_train_images=9"], "not both"),
])
def test_bad_flags_give_one_line_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "x.png"
    assert P.main(flags + [f"--output={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plot_schedule: error: ") and message in err
    assert "\n" not in err and not out.exists()


@pytest.mark.slow  # starts a subprocess
def test_command_line_errors_on_unknown_preset(tmp_path):
    from tests.conftest import python_cmd, run_cmd
    proc = run_cmd(python_cmd("-m", "hooks.plot_schedule", "--lr_schedule=nope",
                              "--global_batch=256", f"--output={tmp_path / 'x.png'}"),
                   check=False)
    assert proc.returncode == 2
    assert "plot_schedule: error: --lr_schedule must be one of" in proc.stderr
