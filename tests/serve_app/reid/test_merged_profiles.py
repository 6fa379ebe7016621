"""A detection never ends on a profile that was merged away: the online insert follows ``merged_into`` to
the surviving profile under a share lock (a stale gallery still names the old one), and a review
assignment racing a merge is refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from serve_app.reid.decision import Thresholds
from serve_app.reid.embedder import Embedder, ModelSpec
from serve_app.reid.identification import Identification, IdentifyRequest
from serve_app.reid.identifier import Identifier, IdentifierOptions
from serve_app.reid.preprocessing import BBox, crop
from serve_app.reid.score_buffer import ScoreBuffer
from serve_app.store.db import make_pool
from tests import factories
from tests.waiting import sessions_waiting_on_locks, wait_until, wait_until_async

SMALL = ModelSpec(architecture="resnet18", weights="random", seed=7, input_size_px=64)
BOX = BBox(0.2, 0.2, 0.5, 0.6)
WHEN = dt.datetime(2024, 5, 1, 6, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(SMALL)


def noise(root: Path, rel: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    image.save(root / rel, format="PNG")  # lossless: the stored crop is the crop sent
    return image


def merge(db: psycopg.Connection[Any], *, source: int, into: int) -> None:
    """What POST /api/deer/{id}/merge commits: detections move, the profile points at the survivor."""
    with db.transaction():
        db.execute("SELECT id FROM deer WHERE id = ANY(%s) ORDER BY id FOR UPDATE", ([source, into],))
        db.execute("UPDATE detections SET deer_id = %s WHERE deer_id = %s", (into, source))
        db.execute("UPDATE deer SET merged_into = %s WHERE id = %s", (into, source))


def two_profiles(db: psycopg.Connection[Any], root: Path) -> tuple[int, int, int, int, dict[int, Any]]:
    """A site with two profiles (the older one first, lower id), each with one gallery frame under ``root``."""
    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    older, survivor = factories.deer(db, site_id=site), factories.deer(db, site_id=site)
    frames = {}
    for deer, seed in ((older, 1), (survivor, 2)):
        rel = f"gallery/{deer}.png"
        frames[deer] = (rel, noise(root, rel, seed))
        image = factories.image(db, camera_id=camera, uri=rel, captured_at=WHEN, width=320, height=240)
        factories.detection(db, image_id=image, deer_id=deer, bbox=(BOX.x, BOX.y, BOX.w, BOX.h))
    return site, camera, older, survivor, frames


def test_a_stale_gallery_match_on_a_merged_profile_is_stored_on_the_survivor(
    embedder: Embedder, database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    site, camera, older, survivor, frames = two_profiles(db, tmp_path)

    def request(deer: int) -> IdentifyRequest:
        rel, image = frames[deer]
        return IdentifyRequest(site, camera, rel, WHEN, 320, 240, BOX, crop(image, BOX))

    async def run() -> tuple[Identification, Identification]:
        pool = make_pool(database_url, max_size=2)
        await pool.open()
        scores = ScoreBuffer(database_url)
        options = IdentifierOptions(image_root=tmp_path, gallery_refresh_s=3600.0)
        identifier = Identifier(embedder, pool=pool, scores=scores, options=options, thresholds=Thresholds(0.55))
        try:
            (before,) = await identifier.identify_batch([request(older)])  # loads the gallery
            await asyncio.to_thread(merge, db, source=older, into=survivor)
            (after,) = await identifier.identify_batch([request(older)])  # the gallery still names `older`
            return before, after
        finally:
            await scores.close()
            await pool.close()

    before, after = asyncio.run(run())
    assert (before.decision, before.deer_id) == ("auto", older)
    assert (after.decision, after.deer_id) == ("auto", survivor)
    assert after.candidates[0].deer_id == survivor and after.candidates[0].similarity >= 0.999
    assert older not in {c.deer_id for c in after.candidates}
    stored = db.execute("SELECT deer_id, decision FROM detections WHERE id = %s", (after.detection_id,)).fetchone()
    assert stored == {"deer_id": survivor, "decision": "auto"}
    logged = db.execute(
        "SELECT deer_id, rank, matched FROM reid_similarity_scores WHERE detection_id = %s ORDER BY rank",
        (after.detection_id,),
    ).fetchall()
    assert [(r["deer_id"], r["rank"], r["matched"]) for r in logged] == [(survivor, 1, True)]


def test_a_review_assignment_racing_a_merge_never_lands_on_the_merged_profile(
    serve_url: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    site = factories.site(db)
    camera = factories.camera(db, site_id=site)
    headers = {"Authorization": f"Bearer {factories.api_key(db, sites=[site])}"}
    older, survivor = factories.deer(db, site_id=site), factories.deer(db, site_id=site)
    item = factories.detection(db, image_id=factories.image(db, camera_id=camera), decision="review")
    answers: dict[str, httpx.Response] = {}

    def post(name: str, path: str, body: dict[str, Any]) -> None:
        answers[name] = httpx.post(serve_url + path, json=body, headers=headers, timeout=60)

    # Hold the survivor's row so the merge stops after it has locked the profile it merges away.
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT id FROM deer WHERE id = %s FOR UPDATE", (survivor,))
        threads = [threading.Thread(target=post, args=("merge", f"/api/deer/{older}/merge", {"into": survivor}))]
        threads[0].start()
        wait_until(lambda: sessions_waiting_on_locks(db) >= 1, what="a session waiting on the lock")
        assign = ("assign", f"/api/detections/{item}/assignment", {"deer_id": older})
        threads.append(threading.Thread(target=post, args=assign))
        threads[1].start()
        wait_until(
            lambda: sessions_waiting_on_locks(db) >= 2, what="two sessions waiting on locks"
        )  # the assignment waits on the merge
        holder.rollback()
        for t in threads:
            t.join(timeout=60)
    assert answers["merge"].status_code == 200, answers["merge"].text
    assert answers["assign"].status_code == 409, answers["assign"].text
    assert answers["assign"].json()["code"] == "deer-merged"
    stored = db.execute("SELECT deer_id, decision FROM detections WHERE id = %s", (item,)).fetchone()
    assert stored == {"deer_id": None, "decision": "review"}
    on_merged = db.execute(
        "SELECT count(*) AS n FROM detections d JOIN deer e ON e.id = d.deer_id WHERE e.merged_into IS NOT NULL"
    ).fetchone()
    assert on_merged["n"] == 0


def test_an_identification_and_a_merge_of_its_gallery_never_deadlock(
    embedder: Embedder, database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """The merge locks its two profiles in id order; identification locks every profile its score rows name in
    one id-ordered statement, so neither can hold the higher id while waiting for the lower."""
    site, camera, older, survivor, frames = two_profiles(db, tmp_path)
    rel, image = frames[survivor]
    request = IdentifyRequest(site, camera, rel, WHEN, 320, 240, BOX, crop(image, BOX))
    outcome: dict[str, Any] = {}

    async def run(merging: psycopg.Connection[Any]) -> None:
        pool = make_pool(database_url, max_size=2)
        await pool.open()
        scores = ScoreBuffer(database_url)  # never started: rows the inline write could not take stay pending
        options = IdentifierOptions(image_root=tmp_path, gallery_refresh_s=3600.0)
        identifier = Identifier(embedder, pool=pool, scores=scores, options=options, thresholds=Thresholds(0.55))
        try:
            await identifier.identify_batch([request])  # loads the gallery
            merging.execute("SELECT id FROM deer WHERE id = %s FOR UPDATE", (older,))  # the merge's first lock
            task = asyncio.create_task(identifier.identify_batch([request]))
            await wait_until_async(
                lambda: sessions_waiting_on_locks(db) >= 1, what="the identification waiting on the lock"
            )  # the identification waits on it
            # The merge's second lock: it would wait on the identification if that held the survivor already.
            await asyncio.to_thread(merging.execute, "SELECT id FROM deer WHERE id = %s FOR UPDATE", (survivor,))
            await asyncio.to_thread(
                merging.execute, "UPDATE deer SET merged_into = %s WHERE id = %s", (survivor, older)
            )
            await asyncio.to_thread(merging.commit)
            (outcome["after"],) = await task
            outcome["pending"] = scores.pending
        finally:
            await scores.close()
            await pool.close()

    with psycopg.connect(database_url) as merging:
        asyncio.run(run(merging))
    after = outcome["after"]
    assert (after.decision, after.deer_id) == ("auto", survivor)
    assert outcome["pending"] == 0  # its score rows went in with the detection: no deadlock aborted the COPY
    logged = db.execute(
        "SELECT deer_id, rank, matched FROM reid_similarity_scores WHERE detection_id = %s ORDER BY rank",
        (after.detection_id,),
    ).fetchall()
    assert [(r["deer_id"], r["rank"], r["matched"]) for r in logged] == [(survivor, 1, True)]
