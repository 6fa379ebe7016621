"""The OpenAPI document served at /docs describes the API and every tag its routes use."""

from __future__ import annotations

from serve_app.ingress import create_app


def test_every_route_tag_has_a_description_at_docs() -> None:
    spec = create_app().openapi()
    described = {tag["name"]: tag.get("description", "") for tag in spec.get("tags", [])}
    used = {tag for ops in spec["paths"].values() for op in ops.values() for tag in op.get("tags", [])}
    assert used, "no route carries a tag"
    missing = sorted(tag for tag in used if not described.get(tag, "").strip())
    assert not missing, f"tags without a description in serve_app/api/openapi.py: {missing}"
    unused = sorted(set(described) - used)
    assert not unused, f"described tags no route uses: {unused}"


def test_the_description_explains_keys_limits_and_errors() -> None:
    description = create_app().openapi()["info"]["description"]
    for term in ("Authorization: Bearer", "413", "problem+json"):
        assert term in description
