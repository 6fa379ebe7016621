"""Site isolation through images: an image row belongs to one camera, so a key for site A, with its own
camera, cannot attach to, create or alter anything of site B by reusing B's image_uri, uploading the same
bytes, or merging profiles; identical uploads land whole under per-camera names."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from serve_app.images import store_upload
from tests import factories

PROBLEM = "application/problem+json"
BBOX = {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}
WHEN = "2024-05-01T06:30:00Z"
LATER = "2024-05-02T06:30:00Z"


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Site:
    """A site with a camera, a key for it alone, two profiles with a sighting each and a review item."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.id = factories.site(db)
        self.camera = factories.camera(db, site_id=self.id)
        self.headers = {"Authorization": f"Bearer {factories.api_key(db, sites=[self.id])}"}
        self.deer = [factories.deer(db, site_id=self.id) for _ in range(2)]
        for deer in self.deer:
            factories.detection(db, image_id=factories.image(db, camera_id=self.camera), deer_id=deer)
        image = factories.image(db, camera_id=self.camera)
        factories.detection(db, image_id=image, decision="review", top1_similarity=0.5)

    def upload(self, client: httpx.Client, data: bytes, *, captured_at: str = WHEN) -> httpx.Response:
        form = {"camera_id": str(self.camera), "captured_at": captured_at, "bbox": '{"x":0.2,"y":0.2,"w":0.5,"h":0.6}'}
        return client.post(
            "/api/detections", data=form, files={"image": ("a.jpg", data, "image/jpeg")}, headers=self.headers
        )

    def body(self, uri: str, *, captured_at: str = WHEN) -> dict[str, Any]:
        return {"image_uri": uri, "camera_id": self.camera, "captured_at": captured_at, "bbox": BBOX}


def counts(db: psycopg.Connection[Any], site_id: int) -> dict[str, int]:
    """How many detections, images and deer a site has."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM detections d JOIN images i ON i.id = d.image_id JOIN cameras c"
        "        ON c.id = i.camera_id WHERE c.site_id = %(s)s) AS detections,"
        " (SELECT count(*) FROM images i JOIN cameras c ON c.id = i.camera_id WHERE c.site_id = %(s)s) AS images,"
        " (SELECT count(*) FROM deer WHERE site_id = %(s)s) AS deer",
        {"s": site_id},
    ).fetchone()
    return dict(row)


def reads(client: httpx.Client, site: Site) -> dict[str, Any]:
    """Everything the site's key reads about its profiles and its review queue."""
    out: dict[str, Any] = {"deer": client.get("/api/deer", headers=site.headers).json()}
    out["review"] = client.get("/api/review", headers=site.headers).json()
    for deer in site.deer:
        out[f"deer/{deer}"] = client.get(f"/api/deer/{deer}", headers=site.headers).json()
    return out


def image_of(db: psycopg.Connection[Any], detection_id: int) -> dict[str, Any]:
    row = db.execute(
        "SELECT i.id, i.uri, i.camera_id FROM detections d JOIN images i ON i.id = d.image_id WHERE d.id = %s",
        (detection_id,),
    ).fetchone()
    assert row is not None
    return dict(row)


def assert_conflict(resp: httpx.Response) -> None:
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    assert resp.json()["code"] == "image-conflict"


def test_site_a_cannot_change_what_site_b_has_or_reads_through_images_or_merges(
    serve_url: str, db: psycopg.Connection[Any]
) -> None:
    a, b = Site(db), Site(db)
    data = jpeg(1)
    with httpx.Client(base_url=serve_url, timeout=120) as client:
        theirs = b.upload(client, data)
        assert theirs.status_code == 201, theirs.text
        b_image = image_of(db, theirs.json()["detection_id"])
        before = (counts(db, b.id), reads(client, b))

        # Identical bytes from A: an image of A's own camera, not B's row.
        mine = a.upload(client, data)
        assert mine.status_code == 201, mine.text
        a_image = image_of(db, mine.json()["detection_id"])
        assert a_image["camera_id"] == a.camera and a_image["id"] != b_image["id"]
        assert a_image["uri"] != b_image["uri"]
        # A reviews its own detection (it is A's, not hidden under B's image).
        own = client.post(
            f"/api/detections/{mine.json()['detection_id']}/assignment", json={"unassign": True}, headers=a.headers
        )
        assert own.status_code == 200, own.text

        # B's image_uri under A's camera, alone or in a batch with a good item: refused, nothing stored.
        a_before = counts(db, a.id)
        assert_conflict(client.post("/api/detections", json=a.body(b_image["uri"]), headers=a.headers))
        batch = {"detections": [a.body(a_image["uri"]), a.body(b_image["uri"])]}
        assert_conflict(client.post("/api/detections/batch", json=batch, headers=a.headers))
        assert counts(db, a.id) == a_before

        # Merges across the sites: refused as if B's profile did not exist.
        for source, into in ((a.deer[0], b.deer[0]), (b.deer[0], a.deer[0])):
            resp = client.post(f"/api/deer/{source}/merge", json={"into": into}, headers=a.headers)
            assert resp.status_code == 404, resp.text

        after = (counts(db, b.id), reads(client, b))
    assert after == before


def test_a_reused_image_must_keep_its_camera_and_capture_time(serve_url: str, db: psycopg.Connection[Any]) -> None:
    site = Site(db)
    other_camera = factories.camera(db, site_id=site.id)
    with httpx.Client(base_url=serve_url, timeout=120) as client:
        first = site.upload(client, jpeg(2))
        assert first.status_code == 201, first.text
        image = image_of(db, first.json()["detection_id"])
        # The same image again (a second box on it): allowed, same row.
        again = client.post("/api/detections", json=site.body(image["uri"]), headers=site.headers)
        assert again.status_code == 201, again.text
        assert image_of(db, again.json()["detection_id"])["id"] == image["id"]
        # Another capture time, or another camera of the same site: refused.
        assert_conflict(
            client.post("/api/detections", json=site.body(image["uri"], captured_at=LATER), headers=site.headers)
        )
        assert_conflict(site.upload(client, jpeg(2), captured_at=LATER))
        moved = {**site.body(image["uri"]), "camera_id": other_camera}
        assert_conflict(client.post("/api/detections", json=moved, headers=site.headers))
    stored = db.execute("SELECT camera_id, captured_at FROM images WHERE id = %s", (image["id"],)).fetchone()
    assert stored["camera_id"] == site.camera and stored["captured_at"].isoformat() == "2024-05-01T06:30:00+00:00"


def test_identical_uploads_at_the_same_moment_each_land_whole(tmp_path: Path) -> None:
    """Every writer uses its own temporary file and an atomic rename: no error, no torn or leftover file."""
    data = jpeg(3) * 20
    errors: list[BaseException] = []
    for round_ in range(10):
        root = tmp_path / f"r{round_}"
        start = threading.Barrier(8)

        def write(camera: int, root: Path = root, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                store_upload(data, root=root, image_format="JPEG", camera_id=camera)
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(1 + i % 2,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        assert [p.relative_to(root).parts[:2] for p in files] == [("uploads", "1"), ("uploads", "2")]
        assert all(p.read_bytes() == data for p in files)
    assert errors == []


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_uploads_are_stored_per_camera(tmp_path: Path, fmt: str, suffix: str) -> None:
    one = store_upload(b"same", root=tmp_path, image_format=fmt, camera_id=1)
    two = store_upload(b"same", root=tmp_path, image_format=fmt, camera_id=2)
    assert one != two and one.startswith("uploads/1/") and two.startswith("uploads/2/")
    assert one.endswith(suffix) and (tmp_path / one).read_bytes() == (tmp_path / two).read_bytes() == b"same"
