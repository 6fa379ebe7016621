"""The project's encoding of the Camtrap DP 1.0 tables says what the standard's own schema files say."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.exports.camtrap_tables import TABLES
from tests.fixtures.camtrap_official import OFFICIAL, needs_official

_RULES = ("name", "type", "format", "constraints")
_TABLE_RULES = ("name", "missingValues", "primaryKey", "foreignKeys")


def _rules(schema: dict[str, Any]) -> dict[str, Any]:
    """What a table schema constrains, without its documentation (descriptions, examples, units, SKOS)."""
    kept = {k: schema[k] for k in _TABLE_RULES if k in schema}
    kept["fields"] = [{k: f[k] for k in _RULES if k in f} for f in schema["fields"]]
    return kept


@needs_official
@pytest.mark.parametrize("table", list(TABLES))
def test_encoding_matches_the_official_table_schema(table: str) -> None:
    official = json.loads((OFFICIAL / f"{table}-table-schema.json").read_text(encoding="utf-8"))
    ours = TABLES[table].table_schema()
    assert [f["name"] for f in ours["fields"]] == [f["name"] for f in official["fields"]]
    assert _rules(ours) == _rules(official)
