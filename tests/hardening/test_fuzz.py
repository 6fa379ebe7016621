"""Schemathesis against the live application's OpenAPI over HTTP (Serve), with a valid key and without.

Every operation gets TRAILCAM_FUZZ_EXAMPLES generated cases (25 in `make test`; `make fuzz` runs more).
Checks: no 5xx, every 4xx/5xx body is application/problem+json, status codes, content types and bodies
conform to the published schema.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import factories

EXAMPLES = int(os.environ.get("TRAILCAM_FUZZ_EXAMPLES", "25"))
REQUEST_TIMEOUT_S = 60
PROBLEM = "application/problem+json"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("TRAILCAM_FUZZ_SEED") is None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    database=None,
)


def problem_json_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error answer is RFC 9457 problem+json with type, title, status and detail."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith(PROBLEM), f"{response.status_code} answered as {content_type!r}"
    body = response.json()
    for name in ("type", "title", "status", "detail"):
        assert name in body, f"problem body lacks {name}: {body}"
    assert body["status"] == response.status_code
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    problem_json_errors,
]


def operations(base_url: str) -> list[Any]:
    """Every operation of the schema the running app publishes."""
    loaded = schemathesis.openapi.from_url(base_url + "/openapi.json")
    return [result.ok() for result in loaded.get_all_operations()]


def fuzz(base_url: str, *, headers: dict[str, str], extra: Any = None) -> dict[str, str]:
    """Run positive and negative cases against every operation; returns failures by operation and mode."""
    failures: dict[str, str] = {}
    for operation in operations(base_url):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
                if extra is not None:
                    extra(case, response)

            try:
                run()
            except Unsatisfiable:
                continue  # nothing in this operation can be made invalid (e.g. no parameters)
            except (Exception, BaseExceptionGroup) as exc:
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    return failures


@pytest.fixture
def fuzz_key(db: psycopg.Connection[Any]) -> str:
    """A key for one site with a camera, a deer and a few detections (ids the fuzzer may hit)."""
    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    deer = factories.deer(db, site_id=site)
    for decision in ("manual", "review", "unassigned"):
        image = factories.image(db, camera_id=camera)
        factories.detection(db, image_id=image, deer_id=deer if decision == "manual" else None, decision=decision)
    return factories.api_key(db, sites=[site])


@pytest.mark.timeout(1800)
def test_fuzz_with_a_valid_key(serve_url: str, fuzz_key: str) -> None:
    failures = fuzz(serve_url, headers={"Authorization": f"Bearer {fuzz_key}"})
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def _needs_key(case: Any, response: Any) -> None:
    if case.path.startswith("/api/"):
        assert response.status_code == 401, f"{case.method} {case.formatted_path}: {response.status_code}"


@pytest.mark.timeout(1800)
def test_fuzz_without_a_key(serve_url: str) -> None:
    failures = fuzz(serve_url, headers={}, extra=_needs_key)
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
