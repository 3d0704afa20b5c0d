"""What a fresh machine installs is what the tests ran on: pyproject.toml's requirements, the pins
of constraints.txt (which the README's commands and .ci/run install with) and this environment
agree. A stale cached venv, an install without `-c constraints.txt`, or a lower bound nobody
tested fails here, naming the package."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for rs in extras.values() for r in rs]]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_requirement_is_pinned_and_its_pin_is_allowed():
    pins = _pins()
    for req in _requirements():
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} is required by pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pin), f"constraints.txt pins {req.name}=={pin}, which {req} refuses"


def test_lower_bounds_are_the_tested_versions():
    """A `>=X` claims X works: X must be the pinned (tested) release, to the precision it is given."""
    pins = _pins()
    for req in _requirements():
        pin = pins[canonicalize_name(req.name)]
        for spec in req.specifier:
            if spec.operator == ">=":
                bound = [int(p) for p in re.findall(r"\d+", spec.version)]
                assert list(pin.release[:len(bound)]) == bound, (
                    f"{req} claims versions older than the tested {req.name}=={pin}")


def test_this_environment_is_the_pinned_one():
    pins = _pins()
    for req in _requirements():
        installed = Version(importlib.metadata.version(req.name))
        assert installed == pins[canonicalize_name(req.name)], (
            f"{req.name} {installed} is installed, constraints.txt pins {pins[canonicalize_name(req.name)]}: "
            "install with `pip install -e \".[test]\" -c constraints.txt` (or a stale cached venv)")
