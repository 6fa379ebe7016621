"""The model registry CLI against real Postgres: register, list, and every refusal, which comes before Serve is
touched (the dashboard address given is closed: reaching it would answer exit code 1, not 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch.models import main, rollback_target, thresholds_for
from tests.batch.model_cards import card_for, fake_weights, version_of
from tests.fixtures.ray_cluster import free_port


@pytest.fixture
def cli(database_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]) -> Any:
    """``python -m batch.models ARGS`` on the test database: (exit code, stdout, stderr)."""
    closed = f"http://127.0.0.1:{free_port()}"

    def run(*args: str) -> tuple[int, str, str]:
        extra = ["--dashboard", closed, "--api-key-file", "/nonexistent"] if args[0] in ("promote", "rollback") else []
        code = main([*args, "--database-url", database_url, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def rows(db: psycopg.Connection[Any]) -> dict[str, str]:
    return {r["version"]: r["status"] for r in db.execute("SELECT version, status FROM model_versions")}


def test_register_stores_the_card_and_registering_again_only_updates_it(
    cli: Any, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    card = card_for(fake_weights(tmp_path, "a"), accept=0.77, review=0.62, top1=0.992)
    version = version_of(card)

    code, out, _ = cli("register", str(card))
    assert (code, out.strip()) == (0, f"registered {version} (candidate)")
    row = db.execute("SELECT * FROM model_versions").fetchone()
    assert row is not None
    assert (row["architecture"], row["input_size_px"], row["parent_version"]) == (
        "resnet18",
        64,
        "resnet18-imagenet-64",
    )
    assert (row["recommended_accept"], row["recommended_review"], row["top1_known"]) == (0.77, 0.62, 0.992)
    assert row["training_data"]["samples"] == 120 and row["training_data"]["stranger_queries"] == 10
    assert row["weights_sha256"] == json.loads(card.read_text())["weights_sha256"]
    assert row["card"] == json.loads(card.read_text())

    data = json.loads(card.read_text())
    data["validation"]["top1_known"] = 0.995
    card.write_text(json.dumps(data))
    code, out, _ = cli("register", str(card))
    assert (code, out.strip()) == (0, f"updated {version} (candidate)")
    assert rows(db) == {version: "candidate"}
    assert db.execute("SELECT top1_known FROM model_versions").fetchone() == {"top1_known": 0.995}


def test_list_shows_each_version_with_status_top1_and_recommended_thresholds(
    cli: Any, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    a = card_for(fake_weights(tmp_path, "a"), accept=0.77, review=0.62, top1=0.992)
    b = card_for(fake_weights(tmp_path, "b"), accept=None, top1=None)
    assert cli("register", str(a), "--status", "active")[0] == 0
    assert cli("register", str(b))[0] == 0

    code, out, _ = cli("list")
    assert code == 0
    header, first, second = out.strip().splitlines()
    assert header.split() == ["version", "status", "top-1", "accept", "review", "promoted"]
    assert first.split()[:5] == [version_of(a), "active", "99.2%", "0.77", "0.62"]
    assert second.split() == [version_of(b), "candidate", "-", "-", "-", "-"]


def test_registering_as_active_records_it_once_and_retires_the_one_before(
    cli: Any, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    a = card_for(fake_weights(tmp_path, "a"), accept=0.7)
    b = card_for(fake_weights(tmp_path, "b"), accept=0.75)
    for card in (a, a, b):  # make run twice with one model, then with another
        assert cli("register", str(card), "--status", "active", "--actor", "make-run")[0] == 0

    assert rows(db) == {version_of(a): "retired", version_of(b): "active"}
    history = db.execute("SELECT version, previous_version, action, actor FROM model_promotions ORDER BY id")
    assert history.fetchall() == [
        {"version": version_of(a), "previous_version": None, "action": "promote", "actor": "make-run"},
        {"version": version_of(b), "previous_version": version_of(a), "action": "promote", "actor": "make-run"},
    ]


def test_register_refuses_a_missing_or_changed_weights_file_with_exit_code_2(
    cli: Any, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    weights = fake_weights(tmp_path, "a")
    card = card_for(weights)
    weights.write_bytes(b"retrained in place")
    code, out, err = cli("register", str(card))
    assert (code, out) == (2, "")
    assert f"refused: the weights file of {version_of(card)} changed: {weights}" in err
    assert "the card says" in err

    weights.unlink()
    code, _, err = cli("register", str(card))
    assert code == 2
    assert err.strip() == f"refused: the weights file of {version_of(card)} is missing: {weights}"

    other = card_for(fake_weights(tmp_path, "b"))
    data = json.loads(other.read_text())
    data["version"] = "resnet18-000000000000-64"
    other.write_text(json.dumps(data))
    code, _, err = cli("register", str(other))
    assert code == 2 and "names version resnet18-000000000000-64, but its weights make it resnet18-" in err

    (tmp_path / "not-a-card.json").write_text("[1, 2]")
    assert cli("register", str(tmp_path / "not-a-card.json"))[0] == 2
    inverted = card_for(fake_weights(tmp_path, "c"), accept=0.6, review=0.7)
    code, _, err = cli("register", str(inverted))
    assert code == 2 and "its review threshold 0.7 is above its accept threshold 0.6" in err
    impossible = card_for(fake_weights(tmp_path, "d"), top1=1.5)
    code, _, err = cli("register", str(impossible))
    assert code == 2 and "has a value the registry cannot hold" in err
    assert rows(db) == {}


def test_promote_and_rollback_refuse_before_serve_is_reached(
    cli: Any, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    a = card_for(fake_weights(tmp_path, "a"))
    b_weights = fake_weights(tmp_path, "b")
    b = card_for(b_weights)
    assert cli("register", str(a), "--status", "active")[0] == 0
    assert cli("register", str(b))[0] == 0
    db.execute(
        "INSERT INTO model_versions (version, architecture, input_size_px, weights_path, weights_sha256, card,"
        " created_at) VALUES ('resnet18-random-seed7-64', 'resnet18', 64, 'random', repeat('0', 64), '{}', now())"
    )
    before = rows(db)

    cases = {
        ("promote", "resnet18-nope-64"): "refused: unknown model version 'resnet18-nope-64' (registered: ",
        ("promote", version_of(a)): f"refused: {version_of(a)} is already the active version",
        ("promote", "resnet18-random-seed7-64"): "refused: resnet18-random-seed7-64 has random weights (tests only)",
        ("rollback",): f"refused: no version was active before {version_of(a)}: nothing to roll back to",
    }
    for args, message in cases.items():
        code, _, err = cli(*args)
        assert (code, err[: len(message)]) == (2, message), (args, err)

    b_weights.write_bytes(b"changed after registering")
    code, _, err = cli("promote", version_of(b))
    assert code == 2 and f"refused: the weights file of {version_of(b)} changed" in err
    b_weights.unlink()
    code, _, err = cli("promote", version_of(b))
    assert code == 2 and f"refused: the weights file of {version_of(b)} is missing" in err

    assert rows(db) == before
    assert db.execute("SELECT count(*) AS n FROM model_promotions").fetchone() == {"n": 1}


def test_a_promote_serve_does_not_take_records_nothing(cli: Any, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    a = card_for(fake_weights(tmp_path, "a"))
    b = card_for(fake_weights(tmp_path, "b"))
    assert cli("register", str(a), "--status", "active")[0] == 0
    assert cli("register", str(b))[0] == 0

    code, _, err = cli("promote", version_of(b))
    assert code == 1
    assert "did not answer" in err and err.strip().endswith("nothing was recorded")
    assert rows(db) == {version_of(a): "active", version_of(b): "candidate"}
    assert db.execute("SELECT count(*) AS n FROM model_promotions").fetchone() == {"n": 1}


def test_no_second_active_version_can_be_stored(cli: Any, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    a, b = card_for(fake_weights(tmp_path, "a")), card_for(fake_weights(tmp_path, "b"))
    assert cli("register", str(a), "--status", "active")[0] == 0
    assert cli("register", str(b))[0] == 0
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("UPDATE model_versions SET status = 'active' WHERE version = %s", (version_of(b),))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE model_versions SET status = 'deployed' WHERE version = %s", (version_of(b),))


def _event(version: str, previous: str | None, action: str) -> dict[str, Any]:
    return {"version": version, "previous_version": previous, "action": action, "accept_threshold": None}


def test_rollback_goes_back_one_version_at_a_time() -> None:
    events = [_event("A", None, "promote"), _event("B", "A", "promote"), _event("C", "B", "promote")]
    assert rollback_target(events, "C") == "B"
    events.append(_event("B", "C", "rollback"))
    assert rollback_target(events, "B") == "A"
    events.append(_event("A", "B", "rollback"))
    assert rollback_target(events, "A") is None
    events.append(_event("C", "A", "promote"))  # promoting again starts from where it stands
    assert rollback_target(events, "C") == "A"


def test_thresholds_come_from_the_card_keeping_the_running_review_band() -> None:
    running = {"accept_threshold": 0.95, "review_threshold": 0.8, "max_batch_size": 16}
    card = {"version": "B", "recommended_accept": 0.77, "recommended_review": None}
    assert thresholds_for(card, running, []) == (0.77, 0.62, "the card's recommendation")
    assert thresholds_for({**card, "recommended_review": 0.7}, running, [])[:2] == (0.77, 0.7)
    none = {**card, "recommended_accept": None}
    earlier = [{**_event("B", None, "promote"), "accept_threshold": 0.6, "review_threshold": 0.5}]
    assert thresholds_for(none, running, earlier) == (0.6, 0.5, "as when it was last active")
    assert thresholds_for(none, running, []) == (0.95, 0.8, "the running ones")
