"""``python -m batch.thresholds apply`` against a real Serve app (resnet18 at 64 px, seeded weights saved to a file so
that its version is not a random-weights one) and real Postgres: a refusal leaves the replicas and the history as
they were; evidence that holds reaches every replica through ``reconfigure`` and is recorded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import torch
from ray import serve

from batch.serve_control import ClientControl, deployed_config
from batch.thresholds import REFUSED, apply, main
from serve_app.reid.backbones import build_backbone
from serve_app.reid.model_spec import version_has_random_weights
from serve_app.store.reports import store_report
from tests import factories
from tests.batch.test_thresholds import a_report
from tests.fixtures.ray_cluster import app_entry, app_settings, small_app_args, wait_ready
from tests.helpers import auth

APP = "thresholds"


def describe() -> dict[str, Any]:
    return dict(serve.get_deployment_handle("ReID", app_name=APP).describe.remote().result(timeout_s=30))


@pytest.fixture(scope="module")
def app_url(
    serve_http_port: int, database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("thresholds")
    weights = root / "resnet18-seed7.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        torch.save(build_backbone("resnet18").state_dict(), weights)
    reid = {"weights": str(weights), "user_config": {"accept_threshold": 0.55, "review_threshold": None}}
    app = app_entry(APP, small_app_args(app_settings(database_url, redis_url, root), **reid))
    control = ClientControl()
    config = deployed_config(control.details())  # every app deployed from a config stays as it is
    control.deploy({**config, "applications": [*config["applications"], app]})
    url = f"http://127.0.0.1:{serve_http_port}/{APP}"
    wait_ready(url, timeout_s=120)
    yield url
    serve.delete(APP)


def history(url: str, key: str) -> list[dict[str, Any]]:
    resp = httpx.get(url + "/api/reid/thresholds/history", headers=auth(key), timeout=10)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["items"])


@pytest.mark.slow
def test_apply_refuses_thin_evidence_and_applies_evidence_that_holds(
    app_url: str, db: psycopg.Connection[Any], database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    version, pid = describe()["model_version"], describe()["pid"]
    assert not version_has_random_weights(version)
    key = factories.api_key(db)
    cli = ["--database-url", database_url, "apply", "--report", "latest", "--app", APP, "--actor", "alice"]

    store_report(db, model_version=version, sites=None, report=a_report(known=20, strangers=5))
    assert main(cli) == REFUSED
    out = capsys.readouterr().out
    assert "refused: nothing changed" in out and "25 labelled detections" in out
    assert (describe()["accept_threshold"], describe()["review_threshold"]) == (0.55, None)
    assert history(app_url, key) == []

    report = store_report(db, model_version=version, sites=None, report=a_report())
    assert main(cli) == 0
    out = capsys.readouterr().out
    assert "applied: accept 0.55, review none -> accept 0.7, review 0.5" in out
    assert (describe()["accept_threshold"], describe()["review_threshold"]) == (0.7, 0.5)
    assert describe()["pid"] == pid  # reconfigured in place: the replica was not replaced
    (change,) = history(app_url, key)
    assert change["actor"] == "alice" and change["model_version"] == version and change["report_id"] == report
    assert change["from"] == {"accept_threshold": 0.55, "review_threshold": None}
    assert change["to"] == {"accept_threshold": 0.7, "review_threshold": 0.5}
    assert change["evidence"]["labelled_samples"] == 220 and change["evidence"]["precision"] == 0.97

    assert main(cli) == 0  # already there: nothing deployed, nothing recorded
    assert "no change: already at accept 0.7, review 0.5" in capsys.readouterr().out
    assert len(history(app_url, key)) == 1


class CtrlCOnceDeployed(ClientControl):
    """Serve's controller as apply uses it, with an operator pressing Ctrl-C once the new thresholds run, while
    apply checks every replica took them (before the change is recorded)."""

    def __init__(self) -> None:
        self.deployed_after: float | None = None
        self.running = False
        self.interrupted = False

    def deploy(self, config: dict[str, Any]) -> None:
        if self.deployed_after is None:
            self.deployed_after = float(super().details()["applications"][APP]["last_deployed_time_s"])
        super().deploy(config)

    def details(self) -> dict[str, Any]:
        if self.running and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        found = super().details()
        app = found["applications"][APP]
        if self.deployed_after is not None and app["status"] == "RUNNING":
            self.running = float(app["last_deployed_time_s"]) > self.deployed_after
        return found


@pytest.mark.slow
def test_an_apply_interrupted_before_it_is_recorded_puts_the_running_thresholds_back(
    app_url: str, db: psycopg.Connection[Any], database_url: str
) -> None:
    before = describe()
    key = factories.api_key(db)
    changes = len(history(app_url, key))
    store_report(db, model_version=before["model_version"], sites=None, report=a_report(recommended=0.8, review=0.6))
    assert (before["accept_threshold"], before["review_threshold"]) != (0.8, 0.6)
    control = CtrlCOnceDeployed()

    with pytest.raises(KeyboardInterrupt):
        apply(database_url, control, actor="alice", app=APP)

    assert control.interrupted
    now = describe()
    assert (now["accept_threshold"], now["review_threshold"]) == (
        before["accept_threshold"],
        before["review_threshold"],
    )
    assert len(history(app_url, key)) == changes  # no row for a change that does not serve
