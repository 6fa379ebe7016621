"""The backfill's task side: a range's detections are decoded in embedding-sized batches, by a module that a
Ray worker imports without torch (a worker started for a task would otherwise spend seconds importing it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from batch import backfill, runs
from batch.results import Scored
from batch.score_writer import write_block
from batch.tasks import decode_crops, read_and_decode, read_ranges
from tests.batch.conftest import Demo, small_options

ROOT = Path(__file__).resolve().parents[2]


def test_the_task_module_imports_no_model_code() -> None:
    code = "import sys, batch.tasks; print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_range_is_decoded_in_batches_of_the_embedding_size(demo: Demo) -> None:
    options = small_options(mode="all")
    with psycopg.connect(demo.dsn, row_factory=dict_row) as conn:
        planned = backfill.plan(conn, options, settings=demo.settings, dry_run=True)
    whole_range = {"lo": np.array([planned.selection.id_min]), "hi": np.array([planned.selection.id_max])}
    source = {"dsn": demo.dsn, "selection": planned.selection}
    size = options.input_size_px
    batches = list(read_and_decode(whole_range, **source, image_root=str(planned.image_root), chunk=7, size_px=size,
                                   draft=False))  # fmt: skip
    total = planned.total
    assert total > 7 and [len(b["detection_id"]) for b in batches] == [7] * (total // 7) + [total % 7] * (total % 7 > 0)
    rows = read_ranges(whole_range, **source)
    expected = decode_crops({name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names},
                            image_root=str(planned.image_root), size_px=size, draft=False)  # fmt: skip
    assert np.concatenate([b["detection_id"] for b in batches]).tolist() == expected["detection_id"].tolist()
    assert np.array_equal(np.concatenate([b["crop"] for b in batches]), expected["crop"])
    assert all(error == "" for b in batches for error in b["error"])


def test_a_range_reads_the_same_rows_while_its_run_writes_and_a_later_plan_skips_them(
    demo: Demo, fresh: psycopg.Connection[dict[str, Any]]
) -> None:
    """A read task Ray runs again (its node lost) must read what it read the first time: rows its run wrote
    since the plan do not shrink the range, or the task's later batches would shift and detections go unscored."""
    options = small_options(mode="missing")
    planned = backfill.plan(fresh, options, settings=demo.settings)
    assert planned.run_id is not None
    whole_range = {"lo": np.array([planned.selection.id_min]), "hi": np.array([planned.selection.id_max])}
    first = read_ranges(whole_range, dsn=demo.dsn, selection=planned.selection).column("detection_id").to_pylist()
    site = fresh.execute("SELECT c.site_id FROM detections d JOIN images i ON i.id = d.image_id"
                         " JOIN cameras c ON c.id = i.camera_id WHERE d.id = %s", (first[0],)).fetchone()  # fmt: skip
    assert site is not None
    deer = [r["id"] for r in fresh.execute("SELECT id FROM deer WHERE site_id = %s LIMIT 2", (site["site_id"],))]
    written = first[:5]
    scored = [Scored(d, site["site_id"], deer, np.full(len(deer), 0.5, dtype=np.float32)) for d in written]
    with psycopg.connect(demo.dsn) as conn:
        counts = write_block(conn, scored, run_id=planned.run_id, model_version=planned.model_version,
                             thresholds=options.thresholds, store_embeddings=False, assign=False)  # fmt: skip
    assert counts.score_rows == len(written) * len(deer) > 0
    again = read_ranges(whole_range, dsn=demo.dsn, selection=planned.selection).column("detection_id").to_pylist()
    assert again == first
    later = dataclasses.replace(planned.selection, scored_before=runs.database_now(fresh))
    resumed = read_ranges(whole_range, dsn=demo.dsn, selection=later).column("detection_id").to_pylist()
    assert resumed == [d for d in first if d not in written]
