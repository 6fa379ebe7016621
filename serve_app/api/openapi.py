"""The API's prose served at /docs: the app-level description and one description per router tag."""

from __future__ import annotations

from typing import Any

API_TITLE = "trailcam-reid"

API_DESCRIPTION = """\
Re-identification of individual deer in trail-camera detections, similarity logging, threshold analysis
and validated sighting exports.

**Keys.** Every `/api` route needs `Authorization: Bearer <key>`; a key sees only its sites, and another
site's detections, deer, review items and exports answer 404 (never 403). The key is checked before the
body is read or parsed: no key, an unknown or a revoked key answers 401. Keys are created and revoked with
`python -m serve_app.keys create|revoke` (see docs/operations.md).

**Body limits.** Bodies are capped before they are read: a `Content-Length` over the limit is refused at
once and a chunked body as soon as its bytes pass it, with 413 and the code `body-too-large` (every
request but an image upload: `TRAILCAM_MAX_JSON_BODY_BYTES`) or `upload-too-large` (an image upload:
`TRAILCAM_MAX_UPLOAD_BYTES`, plus 64,000 bytes of form fields).

**Errors.** Every error answer is RFC 9457 `application/problem+json` with a stable `type` and `code`.
A body that fails validation answers 400 listing every failure as `{"rule", "field", "detail"}`, with
the rule names every route uses: `unknown_field`, `missing_field`, `malformed_json`, `invalid_value`,
`format`. A 503 means a backing service (Redis, Postgres, the model) did not answer: retry later (when it
carries `Retry-After`, after that many seconds).
"""

_IDENTIFICATION = """\
`POST /api/detections` identifies one detection, either as JSON
`{"image_uri": "<path under TRAILCAM_IMAGE_ROOT>", "camera_id": 1, "captured_at": "2026-05-01T06:30:00Z",
"bbox": {"x": 0.2, "y": 0.2, "w": 0.5, "h": 0.6}}` (relative bounding box) or as multipart (`image` file,
`camera_id`, `captured_at`, `bbox` as JSON; other form fields are refused). It answers 201 with
`detection_id`, `model_version`, `decision` (`auto` | `review` | `unassigned`), `deer_id` and the top-k
`candidates`, best first. `POST /api/detections/batch` takes up to 64 items.

**Images.** Image URIs are paths relative to the image root: no URLs, no absolute paths, no `..`, no
symlink escape, no name over 255 bytes (400 `image-uri-*`); a missing or unreadable file answers 422.
Uploads are size-limited and checked for corruption and decompression bombs before they reach the model.
An upload is stored as `uploads/<camera_id>/<sha256>.<ext>`, so identical bytes from two cameras are two
images.

**One image, one camera.** A detection on an image already recorded (its `image_uri`, or an upload of the
same bytes) must name that image's camera and `captured_at`; otherwise it answers 409 `image-conflict` and
nothing is stored. A file under the image root that no image row records yet belongs to the first camera
that posts it, so keep each site's files in a folder of its own. When two cameras post the same new file
at the same moment within one batch, the loser's 409 lists the batch's items that were stored (`stored`:
index and `detection_id`), so a retry leaves them out.

**Decision.** A profile's score is the maximum cosine similarity over its gallery embeddings; at or above
the accept threshold the detection is assigned (`auto`), in the review band it waits for review
(`review`), below it stays `unassigned`. Every similarity computed (one row per detection and profile of
the site) is logged with the threshold in force and the model version.
"""

_REVIEW = """\
`GET /api/review` lists detections in the review band with their candidates (each with
`best_detection_id`, the detection that pictures the profile) and `total`, the count that match: filter by
`site_id`, `camera_id`, capture time (`since`, `until`), top-1 similarity (`min_similarity`,
`max_similarity`), order oldest first (the default) or `order=informative` (closest to the accept threshold
first), page with `limit` and `offset`. `GET /api/detections/{id}` shows one detection the same way, whatever
its decision, with its `review_events` (each decision and its note).
`POST /api/detections/{id}/assignment` decides one: `{"deer_id": ..}`, `{"new_deer": {"name": ..}}` or
`{"unassign": true}`, each with an optional `note`. Assigning to a merged profile answers 409
`deer-merged` (also when the merge commits while the assignment waits). Every assignment change is
recorded in the audit log with the key that made it; manual decisions are never overwritten by automatic
passes (backfill re-decisions included).
"""

_DEER = """\
Deer profiles of the key's sites: `GET /api/deer` (each with `sightings`, `last_seen` and
`best_detection_id`, the detection that pictures it: a person's decision first, then the detector's
confidence, then the newest), `GET /api/deer/{id}` (the same figures, recent sightings and
`sightings_per_week`, UTC weeks from Monday with at least one sighting),
`PATCH /api/deer/{id}` (any of `name`, `sex` `male|female|unknown`, `notes`; a field left out stays,
`null` clears `sex` or `notes`; a merged profile answers 409) and `POST /api/deer/{id}/merge` with
`{"into": id}` (a profile of the same site). No detection ends on a merged profile: its detections move to
the surviving profile, and an automatic match against a gallery loaded before the merge is stored there.
Merges are audited; profile edits change descriptive fields only and are not.
"""

_REID = """\
`GET /api/reid/threshold-report` serves the latest threshold analysis (`python -m batch.analyze`) for the
key's sites: top-1 similarity histogram, assignment rate per threshold, a recommended threshold from a
two-component mixture fit (with a note when the scores are not bimodal enough to trust it) and, when
manual decisions exist, precision/recall/F1 per threshold. With random model weights the report says its
figures are meaningless. `GET /api/reid/threshold-report/{report_id}/histogram.png` draws a report's histogram
with its current and recommended thresholds (site-checked like the report: 404 for one this key may not see).

`GET /api/reid/thresholds/history?limit=50&offset=0` lists the threshold changes applied to the running
app (`python -m batch.thresholds apply`), newest first: `at`, `actor`, `model_version`, `from` and `to`
(`accept_threshold`, `review_threshold`; null: no review band), the `report_id` it rests on and the
`evidence` the guard checked (labelled sample size, precision at the new threshold, target, label source).
Thresholds are one setting of the whole app: any key reads it. Next page: `offset` + `limit`; `limit`
1-500, `offset` 0-1,000,000, anything else answers 400.
"""

_MODELS = """\
`GET /api/models` lists every registered re-ID model version, the active one first: `status`
(`candidate` | `active` | `retired`), architecture and input size, weights SHA-256, parent version,
training data counts, validation figures, recommended thresholds, `created_at` and `promoted_at` (the
last time it became active), plus `serving_version`, the version a ReID replica reports now (null when
none answers). `GET /api/models/{version}` adds the model card and every promote or rollback naming the
version; an unknown version answers 404. Models are not site-scoped: any valid key reads them.
Versions are registered, promoted and rolled back with `python -m batch.models` (see docs/models.md).
"""

_EXPORTS = """\
`POST /api/exports` with `{"start_date": "YYYY-MM-DD", "end_date": "YYYY-MM-DD",
"group_by": "day|week|month", "format": "csv|parquet|json|camtrap-dp", "site_ids": [..]}` (`site_ids`
optional: all of the key's sites; the range covers `start_date` 00:00 UTC to the end of `end_date` UTC).
Every rule is checked before anything is queued: VR-001 start before end, VR-002 at most 365 days,
VR-003 `group_by`, VR-004/VR-005 no date after today (UTC), VR-006..VR-008 `notify` (below), plus
`format`, the `Idempotency-Key` header, `missing_field`, `unknown_field`, `malformed_json` and `site_access`
(unknown ids included). A rejection is 400 listing each failure; no job is created. Acceptance is 202 with
`Location: /api/exports/{id}`.

**Retries.** Send `Idempotency-Key`: the same key and body return the same job, another body answers
422; after a `DELETE`, the next retry makes one new job and later retries find it.

**Notifications.** Add `"notify": {"email": "name@example.org", "webhook_url": "https://..."}` (either or
both) to be told when the job ends, completed or failed: a plain-text e-mail (VR-006 address; VR-008 the
server must have an SMTP host) and/or a JSON `POST` (VR-007 an http or https URL with a host) of `id`,
`event`, `status`, `format`, `finished_at`, `download_url`, `error`, `rows` and `params`, with the headers
`Trailcam-Event: export.completed|export.failed` and `Trailcam-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<raw body>" keyed with the server's webhook secret>`; check it over the raw bytes, in
constant time, and refuse a timestamp far from your clock. A `notify` that cannot be used answers 422
`notify-invalid` listing each failure (with a failed export rule too: the 400). Failed tries (connection
errors, timeouts, HTTP 5xx/429, SMTP 4xx) are retried with doubling waits, a bounded number of times; a
notification never changes the job. The status lists each under `notifications` (`channel`, `target`,
`state` pending|sent|failed, `attempts`, `error`, `updated_at`).

**Lifecycle.** Poll `GET /api/exports/{id}` (with `Retry-After` while processing) until `completed`
(then `GET /api/exports/{id}/download`) or `failed` (a one-line `error`). `DELETE /api/exports/{id}`
cancels the task and removes the job and its file. Status lives in Redis for
`TRAILCAM_EXPORT_STATUS_TTL_S`; a job whose runner stops renewing its lease is failed
"export worker lost". A job, its status and its file are visible only to the key that created it.

**Formats.** csv, parquet and json summaries have one row per (period_start, site_id, camera_id, deer_id)
with deer_name, detections, images, first_seen, last_seen; weeks start on Monday (ISO). `camtrap-dp` is a
Camtrap DP 1.0.2 zip: deployments are cameras, media are images, observations are detections with
`individualID` = deer id, relative bounding boxes and `classificationProbability` = the top-1 similarity
of machine decisions.
"""

_HEALTH = """\
`GET /healthz` answers while the ingress process runs (no key). `GET /readyz` answers 200 when Redis,
Postgres and the model answer and 503 naming the check that failed otherwise.
"""

OPENAPI_TAGS: list[dict[str, Any]] = [
    {"name": "identification", "description": _IDENTIFICATION},
    {"name": "review", "description": _REVIEW},
    {"name": "deer", "description": _DEER},
    {"name": "reid", "description": _REID},
    {"name": "models", "description": _MODELS},
    {"name": "exports", "description": _EXPORTS},
    {"name": "health", "description": _HEALTH},
]
"""Tag descriptions in the order /docs shows them; every tag a router uses has one."""
