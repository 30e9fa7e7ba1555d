"""The checked-in lock (``requirements-lock.txt``) agrees with ``pyproject.toml`` and the Makefile.

``make test``, ``make demo`` and CI install from the lock; a dependency added to, removed from
or re-ranged in ``pyproject.toml`` without ``make lock`` would otherwise go unnoticed until a
fresh install resolved something else.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"
DIRECT = "clip-etl (pyproject.toml)"


def _project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _lock_entries() -> dict[str, list[tuple[Version, set[str]]]]:
    """name -> [(version, what it is required by)] (one entry per Python-version fork)."""
    entries: dict[str, list[tuple[Version, set[str]]]] = {}
    current: set[str] | None = None
    for line in LOCK.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if pin:
            current = set()
            entries.setdefault(canonicalize_name(pin.group(1)), []).append((Version(pin.group(2)), current))
        elif current is not None and line.startswith("    # "):
            source = line[6:].removeprefix("via").strip().lstrip("#").strip()
            if source:
                current.add(source)
    return entries


def test_every_project_dependency_is_locked_within_its_range():
    entries = _lock_entries()
    for name, req in _project_requirements().items():
        assert name in entries, f"{name} is in pyproject.toml but not in {LOCK.name}: run `make lock`"
        for version, sources in entries[name]:
            assert req.specifier.contains(version, prereleases=True), (
                f"{LOCK.name} pins {name}=={version}, outside pyproject's {req}: run `make lock`")
            assert DIRECT in sources, f"{LOCK.name} does not list {name} as a project dependency: run `make lock`"


def test_lock_has_no_direct_dependency_that_pyproject_dropped():
    declared = set(_project_requirements())
    direct = {name for name, pins in _lock_entries().items() if any(DIRECT in src for _, src in pins)}
    assert direct == declared, f"run `make lock`: only in the lock {direct - declared}, only in pyproject {declared - direct}"


def test_lock_pins_the_torch_the_makefile_installs():
    torch_pin = re.search(r"^TORCH := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert [str(v) for v, _ in _lock_entries()["torch"]] == [torch_pin]


def test_lock_parser_sees_the_whole_file():
    """Guard for the checks above: a parser that found nothing would pass them vacuously."""
    entries = _lock_entries()
    assert len(entries) > 50 and {"ray", "pyarrow", "moto"} <= set(entries)
    assert all(src for pins in entries.values() for _, src in pins)
