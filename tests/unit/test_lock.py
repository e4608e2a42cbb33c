"""requirements.lock pins every dependency pyproject.toml declares, at a version it allows."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep, f"not a pin: {line!r}"
            pins[name.lower().replace("_", "-")] = pinned
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [Requirement(r) for r in extra]
    return declared


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for requirement in _declared():
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock (make lock)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


def test_this_environment_runs_the_locked_versions() -> None:
    # scripts/install.sh installs with the lock as constraints: the tests run these.
    for name, pinned in _pins().items():
        try:
            assert version(name) == pinned, name
        except PackageNotFoundError:
            raise AssertionError(f"{name} is locked but not installed") from None
