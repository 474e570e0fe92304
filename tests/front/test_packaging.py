"""What the wheel installs: every package of the library, and the front ends under the t2i namespace only."""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11 and newer")

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_lists_every_package_and_installs_no_top_level_front_end():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(tool["packages"])
    library = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "unclip").rglob("__init__.py")}
    assert library <= packages, f"unclip packages missing from pyproject.toml: {sorted(library - packages)}"
    fronts = {f"t2i.{p.parent.name}" for name in ("stages", "server") for p in [ROOT / name / "__init__.py"]}
    assert fronts | {"t2i", "t2i.checkpoints"} <= packages
    assert not packages & {"cli", "stages", "server"} and "py-modules" not in tool
    assert tool["package-dir"] == {"t2i": "."}  # the repository's root is the t2i namespace: t2i.cli is cli.py
