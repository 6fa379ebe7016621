"""Validate a Camtrap DP 1.0 package against the standard's own table schemas, read from a local folder.

The package's remote schema URLs are replaced by the standard's files in ``TRAILCAM_CAMTRAP_SCHEMA_DIR``
(nothing is fetched at run time); frictionless checks types, constraints, primary and foreign keys.
The result is a list of readable problems.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from frictionless import Package

from serve_app.config import get_settings

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


class SchemasMissing(FileNotFoundError):
    """The Camtrap DP table schemas are not in the configured folder."""


def table_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    """The standard's three table schemas from a local folder (``<table>-table-schema.json``)."""
    schemas = {}
    for table in TABLES:
        path = schema_dir / f"{table}-table-schema.json"
        if not path.is_file():
            raise SchemasMissing(
                f"Camtrap DP table schema {path} not found: set TRAILCAM_CAMTRAP_SCHEMA_DIR (or --schema-dir) to a "
                "folder holding the standard's deployments/media/observations table schemas"
            )
        schemas[table] = json.loads(path.read_text(encoding="utf-8"))
    return schemas


def validate_package(folder: Path, *, schema_dir: Path | None = None) -> dict[str, Any]:
    """The descriptor when the package is valid; raises :class:`PackageRejected` otherwise."""
    schemas = table_schemas(schema_dir if schema_dir is not None else get_settings().camtrap_schema_dir)
    descriptor = read_descriptor(folder)
    names = {r.get("name") for r in descriptor.get("resources", [])}
    missing = [t for t in TABLES if t not in names]
    if missing:
        raise PackageRejected([f"resource {t!r} is missing" for t in missing])
    checked = json.loads(json.dumps(descriptor))
    for resource in checked["resources"]:
        if resource.get("name") in TABLES:
            resource["schema"] = schemas[resource["name"]]
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
