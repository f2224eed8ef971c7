"""Reference docs stay generated from the code, and every public name is documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gen_reference  # noqa: E402


def test_every_public_name_has_a_docstring() -> None:
    assert gen_reference.undocumented() == []


def test_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_changelog_names_this_version() -> None:
    import metered

    assert f"## {metered.__version__}" in (ROOT / "CHANGELOG.md").read_text()
