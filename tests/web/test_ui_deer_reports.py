"""The deer profile pages (grid, profile, edit, merge) and the reports & models page on the app the ingress builds
(real Postgres and Redis, no Ray, no browser), signed in through the form; and the threshold report's histogram
route of the API those pages show."""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image

from batch.models import register
from batch.report import build_report
from serve_app.store.reports import store_report
from serve_app.store.threshold_history import ThresholdChange, record_change
from tests import factories
from tests.batch.model_cards import card_for, fake_weights, version_of
from tests.fixtures.ray_cluster import app_settings
from tests.helpers import auth, write_jpeg
from tests.web.scenario import Scenario, hidden, runner, sign_in

MODEL = "resnet18-0123456789ab-64"
PAGE_LIMIT_BYTES = 30_000


class NoExports:
    """The export queue seam: these pages send no exports."""

    async def submit(self, job_id: str, *, params: dict[str, Any]) -> None:
        raise AssertionError("no export expected")

    async def cancel(self, job_id: str) -> None:
        raise AssertionError("no export expected")


@dataclass(frozen=True)
class Herd:
    """Two profiles at site A (Doe A seen over three weeks, Buck B twice), one at site B, and a key for each site."""

    site: int
    other_site: int
    doe: int
    buck: int
    stranger: int
    doe_best: int
    """Doe A's manual detection: the one that pictures her (a person's decision comes first)."""
    doe_detections: list[int]
    buck_detections: list[int]
    key: str
    other_key: str


def _score(db: psycopg.Connection[Any], detection: int, deer_id: int, similarity: float, at: dt.datetime) -> None:
    db.execute(
        "INSERT INTO reid_similarity_scores (detection_id, deer_id, similarity, rank, threshold, matched,"
        " model_version, source, computed_at) VALUES (%s, %s, %s, 1, 0.6, %s, %s, 'online', %s)",
        (detection, deer_id, similarity, similarity >= 0.6, MODEL, at),
    )


def _sighting(
    db: psycopg.Connection[Any], root: Path, *, camera: int, deer_id: int, when: dt.datetime, decision: str, n: int
) -> int:
    uri = write_jpeg(root, f"herd/{camera}/{n}.jpg", seed=n)
    image = factories.image(db, camera_id=camera, uri=uri, captured_at=when)
    return factories.detection(db, image_id=image, deer_id=deer_id, decision=decision)


@pytest.fixture
def herd(db: psycopg.Connection[Any], tmp_path: Path) -> Herd:
    root = tmp_path / "images"
    site, other = factories.site(db), factories.site(db)
    camera, other_camera = factories.camera(db, site_id=site), factories.camera(db, site_id=other)
    doe = factories.deer(db, site_id=site, name="Doe A")
    buck = factories.deer(db, site_id=site, name="Buck B")
    stranger = factories.deer(db, site_id=other, name="Stranger C")
    now = dt.datetime.now(dt.UTC)
    scored_at = now - dt.timedelta(days=30)
    doe_detections = [
        _sighting(db, root, camera=camera, deer_id=doe, when=now - dt.timedelta(days=d), decision=k, n=i)
        for i, (d, k) in enumerate([(20, "auto"), (13, "manual"), (2, "auto")])
    ]
    buck_detections = [
        _sighting(db, root, camera=camera, deer_id=buck, when=now - dt.timedelta(days=d), decision="auto", n=10 + i)
        for i, d in enumerate([9, 1])
    ]
    _sighting(db, root, camera=other_camera, deer_id=stranger, when=now, decision="auto", n=20)
    for detection, deer_id, similarity in [
        *((d, doe, 0.82) for d in doe_detections), *((d, buck, 0.74) for d in buck_detections)
    ]:  # fmt: skip
        _score(db, detection, deer_id, similarity, scored_at)
    db.execute("UPDATE detections SET reviewed_at = now() WHERE decision = 'manual'")
    return Herd(
        site=site,
        other_site=other,
        doe=doe,
        buck=buck,
        stranger=stranger,
        doe_best=doe_detections[1],
        doe_detections=doe_detections,
        buck_detections=buck_detections,
        key=factories.api_key(db, sites=[site]),
        other_key=factories.api_key(db, sites=[other]),
    )


@pytest.fixture
def run(database_url: str, redis_url: str, tmp_path: Path) -> Callable[[Scenario], None]:
    return runner(app_settings(database_url, redis_url, tmp_path), export_queue=NoExports())


def light(page: httpx.Response) -> httpx.Response:
    """The page, after checking it is HTML under the weight budget."""
    assert page.headers["content-type"].startswith("text/html")
    assert len(page.content) < PAGE_LIMIT_BYTES, f"{page.url.path} weighs {len(page.content)} bytes"
    return page


def images(html: str) -> list[tuple[str, str]]:
    """(src, alt) of every <img>; an image without alt text fails."""
    found = []
    for tag in re.findall(r"<img\b[^>]*>", html):
        src, alt = re.search(r'src="([^"]+)"', tag), re.search(r'alt="([^"]+)"', tag)
        assert src and alt, f"an image without a source or alt text: {tag}"
        found.append((src.group(1), alt.group(1)))
    return found


async def profile(client: httpx.AsyncClient, key: str, deer_id: int) -> dict[str, Any]:
    answer = await client.get(f"/api/deer/{deer_id}", params={"sightings": 50}, headers=auth(key))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_grid_lists_the_sites_profiles_with_their_best_pictures(herd: Herd, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        await sign_in(client, herd.key)
        page = light(await client.get("/ui/deer"))
        html = page.text
        assert "Doe A" in html and "Buck B" in html and "Stranger C" not in html
        assert re.search(r'<ul class="grid deer-grid"', html)
        assert f'href="/ui/deer/{herd.doe}"' in html and f'href="/ui/deer/{herd.buck}"' in html
        pictured = dict(images(html))
        # Doe A is pictured by the detection a person decided; Buck B by one of his.
        assert pictured[f"/ui/crops/{herd.doe_best}"] == "Best picture of Doe A"
        buck_src = next(src for src, alt in pictured.items() if alt == "Best picture of Buck B")
        assert int(buck_src.rsplit("/", 1)[1]) in herd.buck_detections
        for src in pictured:
            crop = await client.get(src)
            assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
            Image.open(io.BytesIO(crop.content)).verify()
        assert "3</dd>" in html.split("Doe A", 1)[1].split("</li>", 1)[0]  # her sightings count
        listed = (await client.get("/api/deer", headers=auth(herd.key))).json()["items"]
        assert {d["id"]: d["best_detection_id"] for d in listed}[herd.doe] == herd.doe_best
        assert all(d["last_seen"] for d in listed)
        filtered = light(await client.get("/ui/deer", params={"site_id": herd.other_site}))
        assert "Doe A" not in filtered.text and f"No individuals yet at site {herd.other_site}." in filtered.text
        refused = light(await client.get("/ui/deer", params={"site_id": "north"}))
        assert refused.status_code == 400
        assert re.search(r'class="field-error" role="alert"><strong>site_id:', refused.text)
        # The other site's key sees only its own individual.
        other = (await client.get("/api/deer", headers=auth(herd.other_key))).json()["items"]
        assert [d["name"] for d in other] == ["Stranger C"]

    run(body)


def test_profile_shows_sightings_and_chart_and_the_edit_form_renames_it(
    herd: Herd, run: Callable[[Scenario], None]
) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, herd.key)
        html = light(await client.get(f"/ui/deer/{herd.doe}")).text
        sources = [src for src, _ in images(html)]
        for detection in herd.doe_detections:
            assert f"/ui/crops/{detection}" in sources
        chart = re.search(r"<svg\b.*?</svg>", html, re.S)
        assert chart and "<title" in chart.group(0) and chart.group(0).count("<rect") >= 3
        summary = re.search(r'<figcaption id="chart-summary">([^<]*)</figcaption>', html)
        assert summary and summary.group(1).startswith("3 sightings in the ")
        assert '<option value="' + str(herd.buck) + '">Buck B' in html  # the merge choice

        saved = await client.post(
            f"/ui/deer/{herd.doe}", data={"csrf": csrf, "name": "Doe Alpha", "sex": "female", "notes": "torn ear"}
        )
        assert saved.status_code == 303 and saved.headers["location"] == f"/ui/deer/{herd.doe}?saved=1"
        now = await profile(client, herd.key, herd.doe)
        assert (now["name"], now["sex"], now["notes"]) == ("Doe Alpha", "female", "torn ear")
        assert "Profile saved." in (await client.get(saved.headers["location"])).text

        refused = await client.post(f"/ui/deer/{herd.doe}", data={"csrf": csrf, "name": "  ", "sex": "", "notes": ""})
        assert refused.status_code == 400
        assert re.search(r'<p class="field-error" id="name-error">[^<]+</p>', refused.text)
        assert (await profile(client, herd.key, herd.doe))["name"] == "Doe Alpha"

    run(body)


def test_an_edit_without_the_form_token_is_refused_and_changes_nothing(
    herd: Herd, run: Callable[[Scenario], None]
) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        await sign_in(client, herd.key)
        for data in ({"name": "Hijacked"}, {"name": "Hijacked", "csrf": "not-the-token"}):
            refused = await client.post(f"/ui/deer/{herd.doe}", data=data)
            assert refused.status_code == 403 and "security token" in refused.text
        assert (await profile(client, herd.key, herd.doe))["name"] == "Doe A"

    run(body)


def test_merge_shows_both_profiles_then_moves_the_detections(herd: Herd, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, herd.key)
        confirm = light(await client.get(f"/ui/deer/{herd.buck}/merge", params={"into": herd.doe}))
        assert confirm.status_code == 200
        assert "Merge Buck B into Doe A?" in confirm.text
        assert 'id="source-title">Goes: Buck B' in confirm.text and 'id="target-title">Stays: Doe A' in confirm.text
        shown = [src for src, _ in images(confirm.text)]
        assert {f"/ui/crops/{d}" for d in herd.buck_detections + herd.doe_detections[1:]} <= set(shown)
        assert hidden(confirm.text, "into") == str(herd.doe)

        unsigned = await client.post(f"/ui/deer/{herd.buck}/merge", data={"into": herd.doe})
        assert unsigned.status_code == 403
        assert (await profile(client, herd.key, herd.buck))["merged_into"] is None

        done = await client.post(
            f"/ui/deer/{herd.buck}/merge", data={"csrf": hidden(confirm.text, "csrf"), "into": herd.doe, "note": "same"}
        )
        assert csrf == hidden(confirm.text, "csrf")
        assert done.status_code == 303
        assert done.headers["location"] == f"/ui/deer/{herd.doe}?merged={herd.buck}&moved=2"
        survivor = await profile(client, herd.key, herd.doe)
        assert survivor["sightings"] == 5
        moved = {s["detection_id"] for s in survivor["recent_sightings"]}
        assert moved == set(herd.doe_detections + herd.buck_detections)
        listed = (await client.get("/api/deer", headers=auth(herd.key))).json()["items"]
        assert [d["name"] for d in listed] == ["Doe A"]
        after = light(await client.get(done.headers["location"]))
        assert f"Profile #{herd.buck} was merged into Doe A: 2 detections moved here." in after.text
        merged = light(await client.get(f"/ui/deer/{herd.buck}"))
        assert "it is read-only" in merged.text and 'action="/ui/deer/' not in merged.text.split("</header>", 1)[1]

    run(body)


def test_another_sites_profile_answers_404_and_stays_unchanged(herd: Herd, run: Callable[[Scenario], None]) -> None:
    async def body(client: httpx.AsyncClient) -> None:
        csrf = await sign_in(client, herd.key)
        for path in (f"/ui/deer/{herd.stranger}", f"/ui/deer/{herd.doe}/merge?into={herd.stranger}"):
            page = await client.get(path)
            assert page.status_code == 404 and "Not found" in page.text, path
        edit = await client.post(f"/ui/deer/{herd.stranger}", data={"csrf": csrf, "name": "Mine now"})
        merge = await client.post(f"/ui/deer/{herd.stranger}/merge", data={"csrf": csrf, "into": herd.doe})
        assert edit.status_code == 404 and merge.status_code == 404
        theirs = await profile(client, herd.other_key, herd.stranger)
        assert theirs["name"] == "Stranger C" and theirs["merged_into"] is None and theirs["sightings"] == 1

    run(body)


def _report(db: psycopg.Connection[Any], herd: Herd) -> dict[str, Any]:
    """A threshold report over site A's scores, built and stored as ``python -m batch.analyze`` does."""
    report = build_report(db, model_version=MODEL, sites=[herd.site])
    report["report_id"] = store_report(db, model_version=MODEL, sites=[herd.site], report=report)
    return report


def test_reports_page_shows_the_report_its_histogram_thresholds_and_models(
    herd: Herd, db: psycopg.Connection[Any], tmp_path: Path, run: Callable[[Scenario], None]
) -> None:
    report = _report(db, herd)
    older = card_for(fake_weights(tmp_path, "a"), accept=0.7, top1=0.97)
    newer = card_for(fake_weights(tmp_path, "b"), accept=0.77, review=0.6, top1=0.99, parent=version_of(older))
    register(db, older, active=True, actor="make-run")
    register(db, newer, actor="alice")
    record_change(db, ThresholdChange("alice", MODEL, 0.6, None, 0.66, 0.5, report["report_id"], {}))

    async def body(client: httpx.AsyncClient) -> None:
        await sign_in(client, herd.key)
        html = light(await client.get("/ui/reports")).text
        assert f"Threshold report #{report['report_id']}: {MODEL}" in html
        shown = re.search(r'<strong id="recommended">([^<]+)</strong>', html)
        assert shown and shown.group(1) == f"{report['recommended_threshold']:.3f}"
        assert re.search(r'<strong id="in-force">0\.660</strong>', html)
        assert "<caption>Assignment rate per threshold</caption>" in html and '<th scope="col">Rate</th>' in html
        assert "Precision and recall against 1 manual decision" in html
        (src, alt), *_ = images(html)
        assert src == f"/ui/reports/{report['report_id']}/histogram.png" and "Histogram" in alt
        picture = await client.get(src)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(picture.content)).size == (900, 480)
        again = await client.get(src, headers={"if-none-match": picture.headers["etag"]})
        assert again.status_code == 304
        for version in (version_of(older), version_of(newer)):
            assert f'href="/ui/reports?model_version={version}"' in html
        assert "active" in html and "retired" not in html and "candidate" in html
        card = light(await client.get("/ui/reports", params={"model_version": version_of(newer)})).text
        assert f"Model card: {version_of(newer)}" in card and version_of(older) in card  # its parent
        assert f"No report yet for model {version_of(newer)}" in card

    run(body)


def test_a_key_without_a_report_sees_no_report_yet(
    herd: Herd, db: psycopg.Connection[Any], run: Callable[[Scenario], None]
) -> None:
    report = _report(db, herd)  # site A's: not for site B's key

    async def body(client: httpx.AsyncClient) -> None:
        await sign_in(client, herd.other_key)
        page = light(await client.get("/ui/reports"))
        assert page.status_code == 200
        assert "No report yet for this key's sites." in page.text and "<img" not in page.text
        assert "No model version is registered yet" in page.text
        picture = await client.get(f"/ui/reports/{report['report_id']}/histogram.png")
        assert picture.status_code == 404

    run(body)


def test_histogram_route_is_site_checked_and_needs_histogram_counts(
    herd: Herd, db: psycopg.Connection[Any], run: Callable[[Scenario], None]
) -> None:
    report = _report(db, herd)
    bare = store_report(db, model_version=MODEL, sites=None, report={"recommended_threshold": 0.7})
    every_site = factories.api_key(db)
    url = "/api/reid/threshold-report/{}/histogram.png"

    async def body(client: httpx.AsyncClient) -> None:
        mine = await client.get(url.format(report["report_id"]), headers=auth(herd.key))
        assert mine.status_code == 200 and mine.content.startswith(b"\x89PNG")
        assert (await client.get(url.format(report["report_id"]), headers=auth(every_site))).status_code == 200
        theirs = await client.get(url.format(report["report_id"]), headers=auth(herd.other_key))
        assert theirs.status_code == 404 and theirs.headers["content-type"].startswith("application/problem+json")
        # An all-sites report is not a site key's, as GET /api/reid/threshold-report decides.
        assert (await client.get(url.format(bare), headers=auth(herd.key))).status_code == 404
        empty = await client.get(url.format(bare), headers=auth(every_site))
        assert empty.status_code == 404 and empty.json()["code"] == "histogram-unavailable"
        for bad in ("0", "x", str(2**63)):
            assert (await client.get(url.format(bad), headers=auth(every_site))).status_code == 400
        assert (await client.get(url.format(report["report_id"]))).status_code == 401

    run(body)
