"""Render docs/reference.md from the docstrings of every public name.

python tools/gen_reference.py            # rewrite docs/reference.md
python tools/gen_reference.py --check    # exit 1 if it is out of date (the tests run this)
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

MODULES = [
    "metered",
    "metered.integrations.flask",
    "metered.integrations.starlette",
    "metered.integrations.fastapi",
    "metered.integrations.wsgi",
    "metered.stripe",
    "metered.server",
    "metered.testing",
]
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if not n.startswith("_")]


_ADDRESS = re.compile(r"<(function|class|built-in function) ([\w.]+)(?: at 0x[0-9a-f]+)?>")


def _signature(obj: Any) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return _ADDRESS.sub(lambda m: m.group(2), text)  # stable across runs


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _members(cls: type) -> list[tuple[str, Any]]:
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in getattr(cls, "model_fields", {}):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if callable(func) and getattr(func, "__doc__", None):
            members.append((name, func))
    return members


def render() -> str:
    lines = [
        "# Reference",
        "",
        "Generated from the docstrings by `python tools/gen_reference.py`; do not edit.",
        "",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", _doc(module), ""]
        for name in sorted(public_names(module), key=str.lower):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            if getattr(obj, "__module__", "").split(".")[0] not in ("metered",):
                continue
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{name}`", "", f"```python\n{kind} {name}{_signature(obj)}\n```", ""]
            lines += [_doc(obj) or "(undocumented)", ""]
            if inspect.isclass(obj):
                fields = getattr(obj, "model_fields", None)
                if fields:
                    lines += ["| field | type |", "|---|---|"]
                    for field_name, field in fields.items():
                        annotation = getattr(field.annotation, "__name__", None) or str(
                            field.annotation
                        ).replace("typing.", "")
                        lines.append(f"| `{field_name}` | `{annotation}` |")
                    lines.append("")
                for member_name, member in _members(obj):
                    lines += [
                        f"- `{name}.{member_name}{_signature(member)}`: "
                        + _doc(member).split("\n\n")[0].replace("\n", " "),
                    ]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    missing = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if (
                (inspect.isclass(obj) or inspect.isfunction(obj))
                and obj.__module__.startswith("metered")
                and not obj.__doc__
            ):
                missing.append(f"{module_name}.{name}")
    return missing


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print("docs/reference.md is out of date: run python tools/gen_reference.py")
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
