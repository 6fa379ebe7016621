"""Promote and roll back on real Serve (``ClientControl``: the test's Ray has no dashboard) while 32 clients
identify over HTTP the whole time: no request fails during either switch, the replicas run the version just
deployed with its card's thresholds, and every identification's detection and score rows carry the version
that answered it, none lost.

Two model versions: resnet18 at 64 px from two seeds, saved as re-ID model files the way ``batch.train`` saves
them, with cards written here.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import torch
from ray import serve

from batch.models import HandleProbe, promote, register, rollback, serving_versions, summary
from batch.serve_control import ClientControl, deployed_config, wait_running
from serve_app.reid.backbones import ReIDNet, build_backbone, save_reid_model
from serve_app.store.db import connect
from tests import factories
from tests.batch.model_cards import card_for, version_of
from tests.fixtures.ray_cluster import app_entry, app_settings, small_app_args, wait_ready
from tests.helpers import auth, write_jpeg
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

APP = "registry"
CLIENTS = 32
DEER = 3  # fewer than top_k: every profile is a candidate, so each answer lists one candidate per score row
CAPTURED = dt.datetime(2024, 5, 1, 6, 30, tzinfo=dt.UTC)
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
THRESHOLDS = {"a": (0.9, 0.8), "b": (0.97, 0.85)}


def save_model(folder: Path, seed: int) -> Path:
    """A re-ID model file (backbone + embedding head) from a seeded random initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReIDNet(build_backbone("resnet18"), 512, 64).eval()
    path = folder / f"seed{seed}.safetensors"
    save_reid_model(net, path, architecture="resnet18", input_size_px=64, extra={"seed": seed})
    return path


def app_config(settings: dict[str, Any], weights: Path, accept: float, review: float) -> dict[str, Any]:
    reid = {
        "weights": str(weights),
        "batch_wait_timeout_s": 0.02,
        "gallery_refresh_s": 0.5,
        "user_config": {"accept_threshold": accept, "review_threshold": review},
    }
    return app_entry(APP, small_app_args(settings, **reid))


@dataclass
class Answer:
    sent: float
    status: int
    body: dict[str, Any]


class Load:
    """``CLIENTS`` threads posting identifications until stopped; every answer is kept."""

    def __init__(self, url: str, headers: dict[str, str], bodies: list[dict[str, Any]]) -> None:
        self.url, self.headers, self.bodies = url + "/api/detections", headers, bodies
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = n
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    resp = client.post(self.url, json=self.bodies[i % len(self.bodies)], headers=self.headers)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                body = resp.json() if resp.headers.get("content-type", "").startswith("application/") else {}
                self.answers.append(Answer(sent, resp.status_code, body))
                i += 1

    def answered_by(self, version: str, *, since: float) -> int:
        return sum(1 for a in self.answers if a.sent > since and a.body.get("model_version") == version)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


@dataclass(frozen=True)
class Running:
    """The app on Serve, running model A from the start."""

    url: str
    images: Path
    card_a: Path
    card_b: Path
    weights_a: Path


@pytest.fixture(scope="module")
def running(
    serve_http_port: int, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("registry")
    weights_a, weights_b = save_model(root / "models", 1), save_model(root / "models", 2)
    card_a = card_for(weights_a, accept=THRESHOLDS["a"][0], review=THRESHOLDS["a"][1])
    card_b = card_for(weights_b, accept=THRESHOLDS["b"][0], review=THRESHOLDS["b"][1])
    control = ClientControl()
    config = deployed_config(control.details())  # the session's other apps stay as they are
    settings = app_settings(database_url, redis_url, root)
    config["applications"].append(app_config(settings, weights_a, *THRESHOLDS["a"]))
    control.deploy(config)
    wait_running(control, app=APP, timeout_s=120, poll_s=0.5)
    url = f"http://127.0.0.1:{serve_http_port}/{APP}"
    wait_ready(url)
    yield Running(url, root / "images", card_a, card_b, weights_a)
    serve.delete(APP)


def test_promote_then_rollback_under_load_fails_no_request_and_attributes_every_row(
    running: Running, database_url: str, db: psycopg.Connection[Any]
) -> None:
    a, b = version_of(running.card_a), version_of(running.card_b)
    register(db, running.card_a, active=True, actor="make-run")
    register(db, running.card_b, actor="test")
    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    for i in range(DEER):
        uri = write_jpeg(running.images, f"gallery/{i}.jpg", seed=100 + i)
        image = factories.image(db, camera_id=camera, uri=uri, width=320, height=240, captured_at=CAPTURED)
        deer = factories.deer(db, site_id=site, name=f"deer-{i}")
        factories.detection(db, image_id=image, deer_id=deer, bbox=(BBOX["x"], BBOX["y"], BBOX["w"], BBOX["h"]))
    bodies = []
    for i in range(8):  # images recorded beforehand: the clients never race to record one
        uri = write_jpeg(running.images, f"queries/{i}.jpg", seed=200 + i)
        factories.image(db, camera_id=camera, uri=uri, width=320, height=240, captured_at=CAPTURED)
        bodies.append({"image_uri": uri, "camera_id": camera, "captured_at": CAPTURED.isoformat(), "bbox": BBOX})
    control, probe = ClientControl(), HandleProbe(APP)
    assert serving_versions(probe) == {a}

    with connect(database_url, autocommit=True) as conn, Load(running.url, auth(factories.api_key(db)), bodies) as load:
        start = time.monotonic()
        wait_until(lambda: load.answered_by(a, since=start) >= CLIENTS, what="answers by A", timeout_s=60)

        promoted = promote(conn, b, control=control, actor="alice", app=APP, timeout_s=120)
        assert serving_versions(probe) == {b}
        after_promote = time.monotonic()
        wait_until(lambda: load.answered_by(b, since=after_promote) >= CLIENTS, what="answers by B", timeout_s=60)

        rolled_back = rollback(conn, control=control, actor="alice", app=APP, timeout_s=120)
        assert serving_versions(probe) == {a}
        after_rollback = time.monotonic()
        wait_until(lambda: load.answered_by(a, since=after_rollback) >= CLIENTS, what="A again", timeout_s=60)

    assert load.errors == []
    assert [x.status for x in load.answers if x.status != 201] == [], [x.body for x in load.answers if x.status != 201]
    assert {x.body["model_version"] for x in load.answers} == {a, b}
    assert load.answered_by(b, since=start) >= CLIENTS

    assert (promoted.event["action"], promoted.event["previous_version"], promoted.event["actor"]) == (
        "promote",
        a,
        "alice",
    )
    assert (rolled_back.event["action"], rolled_back.event["version"], rolled_back.event["previous_version"]) == (
        "rollback", a, b,
    )  # fmt: skip
    assert (rolled_back.event["accept_threshold"], rolled_back.event["review_threshold"]) == THRESHOLDS["a"]
    assert summary(promoted).startswith(f"promote: {b} is active (was {a}); by alice at ")
    assert summary(promoted).endswith(
        f"; accept 0.97, review 0.85 (the card's recommendation); replaced {running.weights_a}"
    )
    statuses = {r["version"]: r["status"] for r in db.execute("SELECT version, status FROM model_versions")}
    assert statuses == {a: "active", b: "retired"}

    # Every answer's detection and score rows carry the version that answered, with its card's threshold.
    answered = {x.body["detection_id"]: x.body for x in load.answers}
    accept = {a: THRESHOLDS["a"][0], b: THRESHOLDS["b"][0]}

    def stored() -> list[dict[str, Any]] | None:
        found = db.execute(
            "SELECT d.id, d.model_version, count(s.id) AS n, array_agg(DISTINCT s.model_version) AS versions,"
            " array_agg(DISTINCT s.threshold) AS thresholds FROM detections d"
            " LEFT JOIN reid_similarity_scores s ON s.detection_id = d.id WHERE d.id = ANY(%s) GROUP BY d.id",
            (list(answered),),
        ).fetchall()
        return found if sum(r["n"] for r in found) >= DEER * len(answered) else None

    rows = wait_until(stored, what="every score row", timeout_s=30, every_s=0.2)
    assert rows is not None
    assert len(rows) == len(answered)
    for row in rows:
        body = answered[row["id"]]
        assert row["model_version"] == body["model_version"], row
        assert row["n"] == len(body["candidates"]) == DEER, row
        assert row["versions"] == [body["model_version"]], row
        assert [round(t, 4) for t in row["thresholds"]] == [accept[body["model_version"]]], row


class CtrlCWhileWaiting(ClientControl):
    """Serve's controller as promote uses it, with an operator pressing Ctrl-C while the new version starts."""

    def __init__(self) -> None:
        self.deploys = 0
        self.interrupted = False

    def deploy(self, config: dict[str, Any]) -> None:
        super().deploy(config)
        self.deploys += 1

    def details(self) -> dict[str, Any]:
        if self.deploys == 1 and not self.interrupted:  # the first look after the new config went out
            self.interrupted = True
            raise KeyboardInterrupt
        return super().details()


def test_a_promote_interrupted_while_it_waits_deploys_the_running_version_back_and_records_nothing(
    running: Running, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    a = version_of(running.card_a)
    register(db, running.card_a, active=True, actor="make-run")
    card_c = card_for(save_model(tmp_path, 3), accept=0.95, review=0.9)
    c = version_of(card_c)
    register(db, card_c, actor="test")
    control = CtrlCWhileWaiting()

    with connect(db.info.dsn, autocommit=True) as conn, pytest.raises(KeyboardInterrupt):
        promote(conn, c, control=control, actor="alice", app=APP, timeout_s=120)

    assert control.interrupted and control.deploys == 2  # the new config, then the one that ran before
    assert serving_versions(HandleProbe(APP)) == {a}
    statuses = {r["version"]: r["status"] for r in db.execute("SELECT version, status FROM model_versions")}
    assert (statuses[a], statuses[c]) == ("active", "candidate")
