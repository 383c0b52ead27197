"""Issue 23: the container files agree with each other and with the Makefile, without
building an image (`make image` / `make image-check` build and run one: docs/container.md).

The Containerfile is parsed as instructions (continuation lines joined); its base must come
from the BASE build argument, and its first `make setup` layer must copy every file the
Makefile's setup stamp depends on (else a changed patch would not rebuild that layer). The
Apptainer definition must read the OCI archive that the documented `podman save` writes, of
the image that scripts/build_image.sh tags.
"""
import re
import subprocess

import pytest

from tests.conftest import ROOT

CONTAINERFILE = ROOT / "container" / "Containerfile"
DEFINITION = ROOT / "container" / "hpc-resnet.def"
DOC = ROOT / "docs" / "container.md"


def instructions(text):
    """[(KEYWORD, arguments)] of a Containerfile: comments dropped, `\\` lines joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(w[0].upper(), w[1] if len(w) > 1 else "")
            for w in (line.strip().split(None, 1) for line in joined.splitlines()) if w]


def stamp_prerequisites():
    """The files the Makefile's `$(STAMP):` rule depends on, $(wildcard ...) dropped."""
    rule = re.search(r"^\$\(STAMP\):(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert rule, "Makefile has no $(STAMP): rule"
    return [w for w in re.sub(r"\$\(wildcard [^)]*\)", "", rule.group(1)).split()]


def test_base_image_is_the_build_argument():
    steps = instructions(CONTAINERFILE.read_text())
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE="), steps[0]
    assert steps[0][1].split("=", 1)[1], "ARG BASE needs a default for a plain build"
    froms = [args for key, args in steps if key == "FROM"]
    assert froms in (["${BASE}"], ["$BASE"]), froms


def test_first_setup_layer_copies_what_the_setup_stamp_depends_on():
    steps = instructions(CONTAINERFILE.read_text())
    first_setup = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "make setup" in a)
    copied = set()
    for key, args in steps[:first_setup]:
        if key == "COPY":
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    needed = set(stamp_prerequisites()) | {"Makefile", "README.md"}  # setup.cfg reads README
    assert needed <= copied, f"not copied before `make setup`: {sorted(needed - copied)}"


def test_the_venv_is_on_path_and_the_context_leaves_out_host_state():
    env = " ".join(a for k, a in instructions(CONTAINERFILE.read_text()) if k == "ENV")
    assert re.search(r"\bPATH=/opt/hpc-resnet/\.venv/bin:", env), env
    ignored = (ROOT / ".containerignore").read_text().split()
    for path in (".git", ".venv", "demo_out", "runs", "shared"):
        assert path in ignored, f".containerignore lets {path} into the image"


def test_definition_reads_the_archive_of_the_built_image():
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)\s*$", DEFINITION.read_text(), re.M))
    assert header["Bootstrap"] == "oci-archive", header
    script = (ROOT / "scripts" / "build_image.sh").read_text()
    image = re.search(r"^IMAGE=\$\{IMAGE:-(\S+)\}$", script, re.M).group(1)
    saves = re.findall(r"podman save --format oci-archive -o (\S+) (\S+)",
                       DEFINITION.read_text() + DOC.read_text())
    assert saves, "neither the definition nor docs/container.md says how to save the image"
    for archive, saved in saves:
        assert (archive, saved) == (header["From"], f"{image}:latest")
    assert "-t \"$IMAGE:latest\"" in script


@pytest.mark.parametrize("script", ["build_image.sh", "run_in_image.sh", "image_info.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
