"""scripts/build_horovod.sh's decisions, with nothing compiled: which MPI it builds against,
the wheel cache key (`--print-flavour`) and when an installed Horovod is kept. Each run has a
PATH of its own (a few real tools, fake MPI compiler wrappers) and a fake interpreter; the
expected keys are recomputed here from the fakes' outputs and the patch files."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "build_horovod.sh"
TF = "2.21.0"
TOOLS = ("bash", "dirname", "basename", "cat", "sha256sum", "cut", "sed", "head", "mkdir", "ls")

OPENMPI = """#!/bin/sh
case "$1" in
  --showme) echo '{show}' ;;
  --showme:version) echo 'mpicxx: Open MPI {version} (Language: C++)' ;;
  *) exit 1 ;;
esac
"""
MPICH = """#!/bin/sh
case "$1" in
  -show) echo '{show}' ;;
  -v) echo 'mpicxx for MPICH version {version}'; echo 'gcc version 12.2.0' >&2 ;;
  *) echo "g++: error: unrecognized command-line option '$1'" >&2; exit 1 ;;
esac
"""


def _patch_level():
    """12 hex digits of a sha256 over the series' names (each with a newline) and contents."""
    digest = hashlib.sha256()
    for patch in sorted((ROOT / "scripts" / "horovod-patches").glob("[0-9]" * 4 + "-*.patch")):
        digest.update(patch.name.encode() + b"\n" + patch.read_bytes())
    return digest.hexdigest()[:12]


def _mpi_key(impl, version, show):
    """What the key says of an MPI: 8 hex digits of a sha256 of its wrapper's compile line."""
    digest = hashlib.sha256(show.encode() + b"\n").hexdigest()[:8]
    return f"mpi-{impl}{version}-{digest}"


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A bin/ of real tools only (no MPI) and a fake PYTHON that says TF's version and notes
    that it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    _executable(tmp_path / "python", f"#!/bin/sh\necho called >> {tmp_path}/python.log\n"
                                     f"echo {TF}\n")
    return tmp_path


def _run(sandbox, *args, path=(), python=None, **env):
    environ = {"PATH": os.pathsep.join([*map(str, path), str(sandbox / "bin")]),
               "HOME": str(sandbox), "PYTHON": str(python or sandbox / "python"),
               "HOROVOD_WHEEL_CACHE": str(sandbox / "cache"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True,
                          text=True, timeout=60)


def _flavour(sandbox, **kwargs):
    proc = _run(sandbox, "--print-flavour", **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _fake_mpi(root, template, show, version):
    _executable(root / "bin" / "mpicxx", template.format(show=show, version=version))
    return root / "bin"


def test_the_key_names_the_mpi_by_its_compile_line(sandbox):
    level = _patch_level()
    debian = "g++ -I/usr/lib/x86_64-linux-gnu/openmpi/include -lmpi_cxx -lmpi"
    site = "c++ -I/home/u/site/openmpi-5/include -L/home/u/site/openmpi-5/lib -lmpi"
    keys = {name: _flavour(sandbox, path=[_fake_mpi(sandbox / name, OPENMPI, show, version)])
            for name, show, version in [("debian", debian, "4.1.4"), ("site", site, "5.0.11"),
                                        ("container", debian, "4.1.4")]}
    assert keys["debian"] == f"tf{TF}-{_mpi_key('openmpi', '4.1.4', debian)}-p{level}"
    assert keys["site"] == f"tf{TF}-{_mpi_key('openmpi', '5.0.11', site)}-p{level}"
    # The same MPI at the same paths, found elsewhere (a container): the same wheel.
    assert keys["container"] == keys["debian"]
    # Same version, another prefix: another wheel.
    moved = site.replace("/home/u/", "/opt/")
    assert _flavour(sandbox, path=[_fake_mpi(sandbox / "moved", OPENMPI, moved, "5.0.11")]) \
        not in keys.values()


def test_mpich_is_told_apart_and_mpi_home_comes_before_path(sandbox):
    show = "g++ -I/opt/mpich/include -L/opt/mpich/lib -lmpichcxx -lmpich"
    mpich = _fake_mpi(sandbox / "mpich", MPICH, show, "4.1.2")
    other = _fake_mpi(sandbox / "other", OPENMPI, "g++ -lmpi", "4.1.4")
    key = _flavour(sandbox, path=[other], MPI_HOME=str(mpich.parent))
    assert key == f"tf{TF}-{_mpi_key('mpich', '4.1.2', show)}-p{_patch_level()}"


def test_without_mpi_the_build_is_gloo_only_and_says_how_to_get_mpi(sandbox):
    proc = _run(sandbox, "--print-flavour")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tf{TF}-gloo-p{_patch_level()}"
    (line,) = proc.stderr.splitlines()
    for needle in ("Gloo-only", "module load", "MPI_HOME", "make cluster-deps"):
        assert needle in line, line
    forced = _run(sandbox, "--print-flavour", path=[_fake_mpi(sandbox / "m", OPENMPI, "x", "5")],
                  HOROVOD_WITHOUT_MPI="1")
    assert forced.stdout.strip().endswith(f"tf{TF}-gloo-p{_patch_level()}")


@pytest.mark.parametrize("args", [["--print-flavour"], []], ids=["print-flavour", "build"])
def test_mpi_home_without_mpicxx_fails_in_one_line_before_anything(sandbox, args):
    home = sandbox / "site" / "mpi"
    _executable(home / "bin" / "mpicc", "#!/bin/sh\nexit 0\n")  # a C wrapper only
    proc = _run(sandbox, *args, MPI_HOME=str(home))
    assert proc.returncode != 0
    (line,) = proc.stderr.splitlines()
    assert f"MPI_HOME={home}" in line and f"{home}/bin/mpicxx" in line, line
    assert not (sandbox / "python.log").exists()  # not even TensorFlow was asked
    assert not (sandbox / "cache").exists()


def _fake_install(sandbox, flavour):
    """A fake TensorFlow + Horovod (built with `flavour`) for a real interpreter, and a PYTHON
    that runs it but only records `-m pip ...` commands."""
    site = sandbox / "site-packages"
    (site / "tensorflow").mkdir(parents=True)
    (site / "tensorflow" / "__init__.py").write_text(f"__version__ = '{TF}'\n")
    (site / "horovod" / "tensorflow").mkdir(parents=True)
    (site / "horovod" / "__init__.py").write_text("__version__ = '0.28.1'\n")
    (site / "horovod" / "tensorflow" / "__init__.py").write_text("def init():\n    pass\n")
    (site / "horovod" / "_hpc_resnet_patches.py").write_text(f"BUILD_FLAVOUR = '{flavour}'\n")
    return _executable(sandbox / "fakepy", f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {sandbox}/pip.log; exit 0; fi
PYTHONPATH={site} exec {sys.executable} "$@"
""")


def test_an_installed_gloo_build_is_replaced_once_an_mpi_appears(sandbox):
    level = _patch_level()
    mpi = _fake_mpi(sandbox / "mpi", OPENMPI, "g++ -lmpi", "4.1.4")
    mpi_flavour = f"tf{TF}-{_mpi_key('openmpi', '4.1.4', 'g++ -lmpi')}-p{level}"
    python = _fake_install(sandbox, f"tf{TF}-gloo-p{level}")
    kept = _run(sandbox, python=python)  # no MPI: the Gloo build is right
    assert kept.returncode == 0 and "already installed" in kept.stdout, kept.stderr
    assert not (sandbox / "pip.log").exists()
    # An MPI now: the wheel cached under the MPI key is installed (the fake install keeps
    # its Gloo flavour, so the check after installing fails, naming the folder).
    wheel = sandbox / "cache" / mpi_flavour / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    replaced = _run(sandbox, path=[mpi], python=python)
    assert replaced.returncode != 0
    installs = (sandbox / "pip.log").read_text().splitlines()
    assert installs[0] == f"-m pip install -q --no-deps --force-reinstall {wheel}"
    assert f"is not flavour {mpi_flavour}" in replaced.stderr.splitlines()[-1]
    # Installed with the MPI flavour: kept.
    _fake_install(sandbox.joinpath("again"), mpi_flavour)
    proc = _run(sandbox, path=[mpi], python=sandbox / "again" / "fakepy")
    assert proc.returncode == 0 and "already installed" in proc.stdout, proc.stderr


def test_unknown_arguments_are_refused(sandbox):
    proc = _run(sandbox, "--flavour")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "[build_horovod] error: unknown argument '--flavour' "
        "(usage: build_horovod.sh [--print-flavour])"]


def test_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "check_site_mpi_setup.sh")],
                   check=True, timeout=30)
