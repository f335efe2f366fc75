"""The house rules, read from the source: who may import whom, and one class per name.

- ``bridge/`` imports nothing from ``adapters/`` (the daemon reaches adapters by name, through the
  registry);
- ``adapters/wechat/`` (what WeCom and the Official Account share) imports no platform folder;
- a platform folder (``adapters/wecom/``, ``adapters/openclaw/``…) imports from ``adapters/wechat/``,
  its own folder and ``bridge/``, never from another platform folder;
- no two classes in ``bridge/`` and ``adapters/`` share a name.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = "wechat"


def modules(package: str) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every module under ``package``."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def imported(module: str, path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against ``module``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # ``from adapters import wecom``
    return out


def folder(module: str) -> str | None:
    """The adapters folder a module belongs to (``adapters.wecom.aibot`` → ``wecom``)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "adapters" and len(parts) > 1 else None


def platform_folders() -> set[str]:
    return {p.name for p in (ROOT / "adapters").iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def violations() -> list[str]:
    platforms = platform_folders() - {SHARED}
    bad = []
    for module, path in modules("bridge"):
        bad += [f"{module} imports {m}" for m in imported(module, path) if m.split(".")[0] == "adapters"]
    for module, path in modules("adapters"):
        home = folder(module)
        if home is None:  # adapters/__init__.py: the registry names modules as strings only
            continue
        for m in imported(module, path):
            target = folder(m)
            if target is None or target == home or (target == SHARED and home != SHARED):
                continue
            if target in platforms or (home == SHARED and target != SHARED):
                bad.append(f"{module} imports {m}")
    return sorted(set(bad))


def test_import_rules_hold() -> None:
    assert violations() == []


def test_the_import_check_sees_a_violation(tmp_path: Path) -> None:
    """The reader resolves the forms a violation could take (so the rule above can fail)."""
    p = tmp_path / "x.py"
    p.write_text(
        "from adapters.wecom.aibot import X\nimport adapters.openclaw.sink\nfrom ..wecom import api\n"
        "from adapters import official_account\n"
    )
    got = imported("adapters.generic.x", p)
    assert {
        "adapters.wecom.aibot",
        "adapters.openclaw.sink",
        "adapters.wecom",
        "adapters.official_account",
    } <= got
    assert {folder(m) for m in got} >= {"wecom", "openclaw", "official_account"}


def class_names() -> dict[str, list[str]]:
    seen: dict[str, list[str]] = defaultdict(list)
    for package in ("bridge", "adapters"):
        for module, path in modules(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.ClassDef):
                    seen[node.name].append(module)
    return seen


def test_no_two_classes_share_a_name() -> None:
    duplicates = {name: where for name, where in class_names().items() if len(where) > 1}
    assert duplicates == {}


@pytest.mark.parametrize("package", ["bridge", "adapters"])
def test_the_class_scan_reads_every_package(package: str) -> None:
    assert any(package + "." in m or m == package for ms in class_names().values() for m in ms)
