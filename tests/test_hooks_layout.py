"""hooks/'s layout (issue #22): the sub-packages its docstring lists are the ones on disk, they
import nothing heavy, and every `hooks/...` path or `hooks.` module name in the code and docs
names a module that exists."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOOKS = ROOT / "hooks"
# The program's edge: what stays at the top of hooks/ (entry points, cheap checks).
EDGE = {"__init__", "entry", "errors", "settings", "runtime", "stderr_filter", "plot_schedule"}
NAMED = re.compile(r"(?<![\w./])hooks(?:(?P<sep>[./])\w+)+")


def _subpackages():
    return sorted(p.parent.name for p in HOOKS.glob("*/__init__.py"))


def test_the_package_docstring_lists_the_subpackages_on_disk():
    listed = re.findall(r"^- `hooks\.(\w+)`", ast.get_docstring(ast.parse(
        (HOOKS / "__init__.py").read_text())), re.M)
    assert sorted(listed) == _subpackages() and len(listed) >= 3


def test_only_the_edge_stays_at_the_top():
    assert {p.stem for p in HOOKS.glob("*.py")} == EDGE


@pytest.mark.parametrize("package", _subpackages())
def test_each_subpackage_init_is_a_docstring_and_nothing_else(package):
    tree = ast.parse((HOOKS / package / "__init__.py").read_text())
    assert ast.get_docstring(tree), f"hooks/{package}/__init__.py has no docstring"
    assert len(tree.body) == 1, f"hooks/{package}/__init__.py does more than say what it holds"


def _names_a_module(name: str) -> bool:
    """`hooks/<pkg>/<mod>.py`, `hooks/<pkg>/<mod>` or `hooks.<pkg>.<mod>.<attr>`: every part up
    to the first module file exists, and a package is followed by one of its modules (an
    __init__ holds nothing)."""
    parts = re.split(r"[./]", name.removesuffix(".py"))
    path = ROOT / parts[0]
    for part in parts[1:]:
        if path.with_suffix(".py").is_file() and path.name != parts[0]:
            return True
        path = path / part
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_hooks_name_in_code_and_docs_exists():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "Makefile"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    stale = {f"{f}: {m[0]}" for f in files if os.path.isfile(ROOT / f)
             for m in NAMED.finditer((ROOT / f).read_text(errors="replace"))
             if not _names_a_module(m[0])}
    assert not stale, "names of no hooks module:\n" + "\n".join(sorted(stale))


@pytest.mark.slow
def test_importing_the_packages_and_cheap_modules_loads_no_tensorflow():
    """Flag checks and the stderr filter run before TensorFlow starts (entry.quiet_startup)."""
    cheap = ["hooks." + p for p in _subpackages()] + [
        "hooks.entry", "hooks.errors", "hooks.settings", "hooks.stderr_filter",
        "hooks.training.steps", "hooks.practices.recipes", "hooks.distributed.elastic_launch"]
    code = (f"import sys, {', '.join(cheap)}; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('keras', 'tensorflow', 'horovod')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
