"""Validate a Camtrap DP 1.0 package against the standard's own table schemas (offline copies).

The package's remote schema URLs are replaced by the copies in batch/camtrap_schemas/; frictionless
checks types, constraints, primary and foreign keys. The result is a list of readable problems.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frictionless import Package

SCHEMAS_DIR = Path(__file__).with_name("camtrap_schemas")
TABLES = ("deployments", "media", "observations")
MAX_PROBLEMS = 50


class PackageRejected(ValueError):
    """The package does not conform to Camtrap DP; ``problems`` says where and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"package fails the Camtrap DP table schemas ({len(problems)} problem(s))")
        self.problems = problems

    def report(self) -> str:
        """One problem per line, for people."""
        return "\n".join([str(self), *(f"  - {p}" for p in self.problems)])


def read_descriptor(folder: Path) -> dict[str, Any]:
    """datapackage.json of a package folder."""
    path = folder / "datapackage.json"
    if not path.is_file():
        raise PackageRejected([f"no datapackage.json in {folder}"])
    descriptor: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return descriptor


def validate_package(folder: Path) -> dict[str, Any]:
    """The descriptor when the package is valid; raises :class:`PackageRejected` otherwise."""
    descriptor = read_descriptor(folder)
    names = {r.get("name") for r in descriptor.get("resources", [])}
    missing = [t for t in TABLES if t not in names]
    if missing:
        raise PackageRejected([f"resource {t!r} is missing" for t in missing])
    checked = json.loads(json.dumps(descriptor))
    for resource in checked["resources"]:
        if resource.get("name") in TABLES:
            resource["schema"] = json.loads((SCHEMAS_DIR / f"{resource['name']}-table-schema.json").read_text())
    checked["profile"] = "data-package"  # the Camtrap DP profile URL is remote; the tables carry the rules
    report = Package(checked, basepath=str(folder)).validate()
    if report.valid:
        return descriptor
    problems: list[str] = [f"package: {e.message}" for e in report.errors]
    for task in report.tasks:
        for error in task.errors:
            where = [task.name or "resource"]
            if getattr(error, "row_number", None):
                where.append(f"row {error.row_number}")
            if getattr(error, "field_name", None):
                where.append(f"field {error.field_name}")
            problems.append(f"{' '.join(where)}: {error.type}: {error.note or error.message}")
    raise PackageRejected(problems[:MAX_PROBLEMS])
