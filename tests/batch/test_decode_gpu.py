"""``--decode gpu`` without a GPU, and its decoding on the CPU: the crops equal the CPU path's within a level or
two of 255, the embedding actor scores them like CPU-decoded crops, a bad file fails only its own detection, and
on a Ray cluster without GPUs the option is refused before anything is written. tests/gpu/ runs it on CUDA."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import torch
from PIL import Image

from batch import backfill, pipeline, tasks
from batch.backfill import run_backfill
from batch.crops import load_crop
from batch.device_crops import device_crops
from batch.pipeline import EmbedAndMatch
from batch.results import from_table
from batch.runs import BackfillOptions
from batch.tasks import decode_crops, read_files
from serve_app.reid.preprocessing import BBox
from tests.batch.conftest import Demo, small_options

CPU = torch.device("cpu")
SERVED = {"architecture": "mobilenet_v2", "weights": "imagenet", "input_size_px": 128, "batch_size": 16}
COLUMNS = ("detection_id", "site_id", "uri", "bbox_x", "bbox_y", "bbox_w", "bbox_h")


def detections(conn: psycopg.Connection[Any], n: int) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT d.id AS detection_id, c.site_id, i.uri, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h FROM detections d"
        " JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id ORDER BY d.id LIMIT %s",
        (n,),
    ).fetchall()


def as_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as the numpy batch Ray Data hands a stage."""
    return {k: np.array([r[k] for r in rows]) for k in COLUMNS}


def numpy_batch(table: Any) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


@pytest.mark.parametrize("size_px", [64, 128, 224])
def test_device_crops_equal_the_cpu_paths_crops_within_two_levels(demo: Demo, fresh: Any, size_px: int) -> None:
    rows = detections(fresh, 12)
    paths = [demo.image_root / r["uri"] for r in rows]
    bboxes = [BBox(r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]) for r in rows]
    crops, errors = device_crops([r["uri"] for r in rows], [p.read_bytes() for p in paths], bboxes,
                                 size_px=size_px, device=CPU)  # fmt: skip
    assert errors == [""] * len(rows) and crops.dtype == torch.uint8
    expected = np.stack([load_crop(p, b, size_px=size_px) for p, b in zip(paths, bboxes, strict=True)])
    difference = np.abs(crops.numpy().astype(int) - expected.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.5


def test_a_bad_file_fails_only_its_own_detection_and_other_formats_decode(
    demo: Demo, fresh: Any, caplog: pytest.LogCaptureFixture
) -> None:
    (row,) = detections(fresh, 1)
    jpeg = (demo.image_root / row["uri"]).read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    bbox = BBox(row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
    uris = ["a/ok.jpg", "a/truncated.jpg", "a/ok.png", "a/text.jpg", "a/ok.jpg"]
    blobs = [jpeg, jpeg[: len(jpeg) // 8], png.getvalue(), b"not an image", jpeg]
    with caplog.at_level(logging.DEBUG, logger="batch.device_crops"):  # a warning the first time in a process
        crops, errors = device_crops(uris, blobs, [bbox] * 5, size_px=64, device=CPU)
    # The JPEG decoder's refusals are said, so a device that refuses every file does not pass unnoticed (the
    # two detections on ok.jpg share one decode).
    said = [r.getMessage() for r in caplog.records]
    assert said == ["the cpu JPEG decoder refused 1 of 2 JPEGs; PIL decodes them"]
    assert errors[0] == errors[2] == errors[4] == ""
    assert errors[1].startswith("cannot read truncated.jpg: ") and errors[3].startswith("cannot read text.jpg: ")
    assert torch.equal(crops[0], crops[4]) and crops[0].float().mean() > 0
    assert (crops[2].int() - crops[0].int()).abs().max() <= 2  # PNG of the same pixels (lossless after decode)
    assert int(crops[1].sum()) == int(crops[3].sum()) == 0


def test_read_files_reports_missing_and_refused_files_per_detection(demo: Demo, fresh: Any) -> None:
    rows = detections(fresh, 2)
    rows += [{**rows[0], "detection_id": -1, "uri": "nowhere/missing.jpg"},
             {**rows[0], "detection_id": -2, "uri": "../outside.jpg"}]  # fmt: skip
    table = read_files(as_batch(rows), image_root=str(demo.image_root))
    errors = table["error"].to_pylist()
    assert errors[:2] == ["", ""] and [len(b) for b in table["data"].to_pylist()[:2]] == [
        (demo.image_root / r["uri"]).stat().st_size for r in rows[:2]
    ]
    assert errors[2].startswith("cannot read missing.jpg: ") and "refused" in errors[3]
    assert table["data"].to_pylist()[2:] == [b"", b""]


def test_the_actor_scores_files_it_decodes_like_crops_decoded_on_the_cpus(demo: Demo, fresh: Any) -> None:
    """EmbedAndMatch on the CPU, fed file bytes (read_files) vs crops (decode_crops): the same detections scored
    alike, and unreadable files reported, not scored."""
    options = BackfillOptions(**SERVED)
    rows = detections(fresh, 24)
    rows.append({**rows[0], "detection_id": -1, "uri": "nowhere/missing.jpg"})
    sites = sorted({r["site_id"] for r in rows})
    actor = EmbedAndMatch(options=options.as_json(), dsn=demo.dsn, image_root=str(demo.image_root), sites=sites,
                          store=False, cpu_threads=0)  # fmt: skip
    batch = as_batch(rows)
    decoded = decode_crops(batch, image_root=str(demo.image_root), size_px=options.input_size_px, draft=False)
    files = numpy_batch(read_files(batch, image_root=str(demo.image_root)))
    by_cpus = {s.detection_id: s for s in from_table(actor(decoded))}
    by_actor = {s.detection_id: s for s in from_table(actor(files))}
    assert by_actor.keys() == by_cpus.keys() == {r["detection_id"] for r in rows}
    assert by_actor[-1].error is not None and by_actor[-1].error.startswith("cannot read missing.jpg")
    for detection_id, expected in by_cpus.items():
        got = by_actor[detection_id]
        assert got.deer_ids == expected.deer_ids
        if detection_id > 0:
            assert got.error is None and len(got.similarities) == len(expected.similarities) > 0
            np.testing.assert_allclose(got.similarities, expected.similarities, atol=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; tests/gpu/ runs --decode gpu on it")
@pytest.mark.usefixtures("ray_session")
def test_decode_gpu_is_refused_on_a_cluster_without_gpus_and_nothing_is_written(
    demo: Demo, fresh: psycopg.Connection[Any], keep_sigterm: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"--decode gpu .* this Ray cluster has no GPU"):
        run_backfill(small_options(mode="all", decode="gpu"), settings=demo.settings)
    dry = ["--dry-run", "--model", "resnet18:random", "--input-size-px", "64", "--mode", "all", "--decode", "gpu"]
    code = backfill.main([*dry, "--database-url", demo.dsn, "--image-root", str(Path(demo.image_root))])
    assert code == 2
    assert "error: --decode gpu decodes the images on the embedding actors' GPUs" in capsys.readouterr().err
    for table in ("backfill_runs", "reid_similarity_scores"):
        assert fresh.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"] == 0


@pytest.mark.usefixtures("ray_session")
def test_the_file_reading_stage_feeds_decoding_actors_through_ray_data(demo: Demo, fresh: Any) -> None:
    """The --decode gpu pipeline (read_and_fetch tasks -> actors that decode) as Ray Data runs it, on CPU actors here
    (build_dataset itself does not refuse; run_backfill does, above): every detection scored, none failed, as many
    score rows as with CPU decoding, and the same top-1 scores within tolerance."""
    summaries = {}
    for decode in ("exact", "gpu"):
        options = small_options(mode="all", decode=decode)
        with psycopg.connect(demo.dsn, row_factory=psycopg.rows.dict_row) as conn:
            planned = backfill.plan(conn, options, settings=demo.settings, dry_run=True)
        ds = pipeline.build_dataset(dsn=demo.dsn, selection=planned.selection, ranges=list(planned.ranges),
                                    options=options, image_root=planned.image_root, sites=list(planned.sites),
                                    store_galleries=False)  # fmt: skip
        sink = tasks.DryRunSink(model_version=planned.model_version, options=options)
        ds.write_datasink(sink)
        summaries[decode] = sink.summary
        assert (sink.summary["detections"], sink.summary["failed"]) == (planned.total, 0) and planned.total > 0
    exact, gpu = summaries["exact"], summaries["gpu"]
    assert gpu["score_rows"] == exact["score_rows"] and gpu["sample"]
    # The samples are the first rows the write tasks saw, whichever finished first: compare the ones both kept.
    exact_top1 = {s["detection_id"]: s["top1"] for s in exact["sample"]}
    for sample in gpu["sample"]:
        if sample["detection_id"] in exact_top1:
            assert abs(sample["top1"] - exact_top1[sample["detection_id"]]) < 0.02
