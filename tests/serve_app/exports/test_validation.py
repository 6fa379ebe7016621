"""Rules VR-001..VR-005 on both sides of each boundary, plus shape checks, all reported together."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from serve_app.exports.validation import validate_export_request
from serve_app.keys import Principal

TODAY = dt.date(2024, 6, 15)
ALL = Principal(key_id=1, all_sites=True)
SITE_1 = Principal(key_id=2, all_sites=False, site_ids=frozenset({1}))


def body(start: dt.date | str, end: dt.date | str, **extra: Any) -> dict[str, Any]:
    return {"start_date": str(start), "end_date": str(end), "group_by": "day", "format": "csv", **extra}


def rules(payload: object, principal: Principal = ALL) -> list[tuple[str, str]]:
    _, errors = validate_export_request(payload, principal=principal, today=TODAY)
    return [(e.rule, e.field) for e in errors]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (dt.date(2024, 6, 1), dt.date(2024, 6, 1), [("VR-001", "end_date")]),  # equal dates
        (dt.date(2024, 6, 2), dt.date(2024, 6, 1), [("VR-001", "end_date")]),
        (dt.date(2024, 5, 31), dt.date(2024, 6, 1), []),
        (dt.date(2023, 6, 1), dt.date(2024, 5, 31), []),  # 365 days
        (dt.date(2023, 5, 31), dt.date(2024, 5, 31), [("VR-002", "end_date")]),  # 366 days
        (dt.date(2023, 3, 1), dt.date(2024, 2, 29), []),  # 365 days ending on the leap day
        (dt.date(2023, 3, 1), dt.date(2024, 3, 1), [("VR-002", "end_date")]),  # 366 days across it
        (dt.date(2024, 6, 14), TODAY, []),  # end today
        (TODAY, TODAY + dt.timedelta(days=1), [("VR-005", "end_date")]),  # start today, end tomorrow
        (
            TODAY + dt.timedelta(days=1),
            TODAY + dt.timedelta(days=2),
            [("VR-004", "start_date"), ("VR-005", "end_date")],
        ),
    ],
)
def test_date_rules_at_their_boundaries(start: dt.date, end: dt.date, expected: list[tuple[str, str]]) -> None:
    assert rules(body(start, end)) == expected


@pytest.mark.parametrize("group_by", ["day", "week", "month"])
def test_each_group_by_is_accepted(group_by: str) -> None:
    request, errors = validate_export_request(
        body("2024-01-01", "2024-02-01", group_by=group_by), principal=ALL, today=TODAY
    )
    assert errors == [] and request is not None and request.group_by == group_by


@pytest.mark.parametrize("group_by", ["year", "", None, 7, "Day"])
def test_group_by_outside_the_set_is_vr_003(group_by: object) -> None:
    assert rules(body("2024-01-01", "2024-02-01", group_by=group_by)) == [("VR-003", "group_by")]


def test_every_failed_rule_is_listed_at_once() -> None:
    payload = {"start_date": "2026-01-01", "end_date": "2024-01-01", "group_by": "year", "format": "xml", "x": 1}
    found = rules(payload)
    assert ("unknown_field", "x") in found
    assert ("VR-001", "end_date") in found
    assert ("VR-003", "group_by") in found
    assert ("VR-004", "start_date") in found
    assert ("invalid_value", "format") in found
    far = rules(body("2022-01-01", "2025-01-01", group_by="hour"))
    assert sorted(far) == [("VR-002", "end_date"), ("VR-003", "group_by"), ("VR-005", "end_date")]


@pytest.mark.parametrize("value", ["2024-13-01", "2024-02-30", "15/06/2024", "20240101", "", 20240101, None])
def test_malformed_dates_are_format_errors(value: object) -> None:
    assert rules({**body("2024-01-01", "2024-02-01"), "start_date": value}) == [("format", "start_date")]


def test_missing_and_unknown_fields_are_named() -> None:
    assert rules({"start_date": "2024-01-01", "colour": "red"}) == [
        ("unknown_field", "colour"),
        ("missing_field", "end_date"),
        ("missing_field", "group_by"),
        ("missing_field", "format"),
    ]
    assert rules([1, 2]) == [("format", "body")]


def test_sites_outside_the_key_are_refused_and_defaults_follow_the_key() -> None:
    assert rules(body("2024-01-01", "2024-02-01", site_ids=[1, 2]), SITE_1) == [("site_access", "site_ids")]
    assert rules(body("2024-01-01", "2024-02-01", site_ids=[]), SITE_1) == [("format", "site_ids")]
    assert rules(body("2024-01-01", "2024-02-01", site_ids=["1"]), SITE_1) == [("format", "site_ids")]
    request, _ = validate_export_request(body("2024-01-01", "2024-02-01"), principal=SITE_1, today=TODAY)
    assert request is not None
    assert request.params(SITE_1)["site_ids"] == [1]
    assert request.params(ALL)["site_ids"] is None
