"""Validate a Camtrap DP 1.0 package against the standard's table constraints, held in the repository.

The package's remote schema URLs are replaced by the project's encoding of the standard's tables
(``serve_app.exports.camtrap_tables``; nothing is read or fetched from elsewhere); frictionless checks
types, constraints, primary and foreign keys. The result is a list of readable problems.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frictionless import Package

from serve_app.exports.camtrap_tables import TABLES

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
            resource["schema"] = TABLES[resource["name"]].table_schema()
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
