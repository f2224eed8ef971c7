"""The ``metered`` console script, run as users run it (a subprocess), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

METERED = str(Path(sys.executable).with_name("metered"))
PLANS_TOML = """
default_plan = "free"
[plans.free.features]
api_calls = 100
[plans.pro]
prices = ["price_pro_monthly"]
features = { api_calls = 10000, reports = true }
"""


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERED, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    path = tmp_path / "plans.toml"
    path.write_text(PLANS_TOML)
    return path


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_commands_end_to_end(database_url: str, plans: Path, tmp_path: Path) -> None:
    env = {"METERED_DATABASE_URL": database_url, "METERED_PLANS": str(plans)}
    current = run("db", "current", cwd=tmp_path, env=env)
    assert current.returncode == 0 and "no metered schema" in current.stdout
    upgraded = run("db", "upgrade", "--json", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert json.loads(upgraded.stdout)["revision"]

    assert run("assign", "org_1", "pro", cwd=tmp_path, env=env).returncode == 0
    granted = run(
        "grant",
        "org_1",
        "250",
        "--feature",
        "api_calls",
        "--key",
        "promo-1",
        "--json",
        cwd=tmp_path,
        env=env,
    )
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["replayed"] is False
    again = run(
        "grant",
        "org_1",
        "250",
        "--feature",
        "api_calls",
        "--key",
        "promo-1",
        "--json",
        cwd=tmp_path,
        env=env,
    )
    assert json.loads(again.stdout)["replayed"] is True

    balance = run("balance", "org_1", "--json", cwd=tmp_path, env=env)
    (row,) = json.loads(balance.stdout)
    assert (row["plan"], row["allowance"], row["credits"], row["usage_remaining"]) == (
        "pro",
        10000,
        250,
        10250,
    )
    human = run("balance", "org_1", cwd=tmp_path, env=env).stdout
    assert human.splitlines()[0].split()[:3] == ["FEATURE", "PLAN", "STATUS"]
    assert "10250" in human

    history = json.loads(run("history", "org_1", "--json", cwd=tmp_path, env=env).stdout)
    assert [(e["kind"], e["units"], e["key"]) for e in history][:1] == [("grant", 250, "promo-1")]

    down = run("db", "downgrade", "base", cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert "base" in down.stdout


def test_errors_are_one_line_with_documented_exit_codes(plans: Path, tmp_path: Path) -> None:
    env = {"METERED_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}", "METERED_PLANS": str(plans)}
    assert run("db", "upgrade", cwd=tmp_path, env=env).returncode == 0

    unknown = run("assign", "org_1", "platinum", cwd=tmp_path, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and "unknown plan 'platinum'" in unknown.stderr

    mismatch = run(
        "grant", "org_1", "5", "--feature", "api_calls", "--key", "k", cwd=tmp_path, env=env
    )
    assert mismatch.returncode == 0
    reused = run(
        "grant", "org_1", "6", "--feature", "api_calls", "--key", "k", cwd=tmp_path, env=env
    )
    assert reused.returncode == 1 and "IdempotencyKeyMismatch" in reused.stderr

    no_plans = run("balance", "org_1", cwd=tmp_path, env={"METERED_PLANS": ""})
    assert no_plans.returncode == 2 and "--plans" in no_plans.stderr

    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("[plans.free]\nfeatures = { api_calls = -1 }\n")
    invalid = run("plans", "validate", str(bad_file), cwd=tmp_path)
    assert invalid.returncode == 2 and "Traceback" not in invalid.stderr

    valid = run("plans", "validate", str(plans), cwd=tmp_path)
    assert valid.returncode == 0 and "valid" in valid.stdout

    down = run(
        "balance",
        "org_1",
        "--url",
        "postgresql://nobody@127.0.0.1:9/none",
        cwd=tmp_path,
        env={"METERED_PLANS": str(plans)},
    )
    assert down.returncode == 3
    assert down.stderr.strip().count("\n") == 0 and "unavailable" in down.stderr


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    result = run("demo", cwd=tmp_path, env={"METERED_DATABASE_URL": ""})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert result.stderr == ""
    lines = {
        line.split("->")[0].strip(): line.split("->")[1].strip()
        for line in out.splitlines()
        if "->" in line
    }

    def status(step_prefix: str) -> str:
        (value,) = [v for k, v in lines.items() if k.startswith(step_prefix)]
        return value

    assert status("metered call").startswith("403")
    assert status("checkout.session.completed") == "200 applied"
    assert status("same event delivered again") == "200 duplicate"
    assert status("tampered body").startswith("400")
    assert status("report, now on pro").startswith("200")
    assert status("handler raises").startswith("500")
    for n in range(1, 6):
        assert status(f"call {n} ") == f"200   remaining={5 - n}"
    assert status("call 6 ").startswith("402")
    assert status("retry of call 1").startswith("200")
    balance_row = out.split("5. Balance and history")[1].strip().splitlines()[2]
    assert balance_row.split()[:6] == ["pro", "active", "5", "5", "0", "0"]
    assert (tmp_path / "metered.db").exists()  # the embedded SQLite default


def test_demo_and_replay_need_no_test_dependencies(tmp_path: Path) -> None:
    """A user's install has no pytest: the demo must not import it (nor the CLI)."""
    script = (
        "import sys; sys.modules['pytest'] = None; sys.modules['hypothesis'] = None\n"
        "from metered.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "METERED_DATABASE_URL": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "-> 402" in result.stdout
