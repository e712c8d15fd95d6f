"""The tree passes the linter and the formatter configured in pyproject.toml."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args):
    exe = shutil.which("ruff")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args", [("check", "."), ("format", "--check", ".")], ids=["check", "format"]
)
def test_ruff(args):
    done = _ruff(*args)
    assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_ruff_is_the_pinned_version():
    """The test extra pins ruff exactly (a new release may format or lint unchanged code
    differently): the ruff that checked the tree above is that one."""
    specs = re.findall(r'"(ruff\b[^"]*)"', (ROOT / "pyproject.toml").read_text("utf-8"))
    pins = [re.fullmatch(r"ruff==(\d+(?:\.\d+)*)", spec) for spec in specs]
    assert len(pins) == 1 and pins[0], f"pyproject.toml should pin ruff exactly once: {specs}"
    done = _ruff("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ruff", pins[0].group(1)], (
        f"{done.stdout.strip()} is installed, pyproject.toml pins {pins[0].group(1)}: "
        "pip install -e '.[test]'"
    )
