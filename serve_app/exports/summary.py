"""Sighting summaries: one row per (period, site, camera, deer) as CSV, Parquet or JSON."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 5000
COLUMNS = (
    "period_start",
    "site_id",
    "camera_id",
    "deer_id",
    "deer_name",
    "detections",
    "images",
    "first_seen",
    "last_seen",
)
ARROW_SCHEMA = pa.schema(
    [
        ("period_start", pa.date32()),
        ("site_id", pa.int64()),
        ("camera_id", pa.int64()),
        ("deer_id", pa.int64()),
        ("deer_name", pa.string()),
        ("detections", pa.int64()),
        ("images", pa.int64()),
        ("first_seen", pa.timestamp("us", tz="UTC")),
        ("last_seen", pa.timestamp("us", tz="UTC")),
    ]
)

# date_trunc on the UTC wall clock: 'week' starts on the ISO Monday, 'month' on the 1st.
SUMMARY_SQL = """
SELECT (date_trunc(%(unit)s, i.captured_at AT TIME ZONE 'UTC'))::date AS period_start,
       c.site_id, i.camera_id, d.deer_id, dr.name AS deer_name,
       count(*) AS detections, count(DISTINCT d.image_id) AS images,
       min(i.captured_at) AS first_seen, max(i.captured_at) AS last_seen
FROM detections d
JOIN images i ON i.id = d.image_id
JOIN cameras c ON c.id = i.camera_id
LEFT JOIN deer dr ON dr.id = d.deer_id
WHERE i.captured_at >= %(start)s AND i.captured_at < %(end)s
  AND (%(sites)s::bigint[] IS NULL OR c.site_id = ANY(%(sites)s::bigint[]))
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4 NULLS LAST
"""

Check = Callable[[], None]


def time_window(params: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    """[start_date 00:00 UTC, the day after end_date 00:00 UTC): the whole end day included."""
    start = dt.datetime.combine(dt.date.fromisoformat(params["start_date"]), dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(dt.date.fromisoformat(params["end_date"]), dt.time(), tzinfo=dt.UTC)
    return start, end + dt.timedelta(days=1)


def query_args(params: dict[str, Any]) -> dict[str, Any]:
    """Bind values shared by the export queries."""
    start, end = time_window(params)
    return {"start": start, "end": end, "sites": params.get("site_ids"), "unit": params.get("group_by", "day")}


def iso_utc(value: dt.datetime | None) -> str | None:
    """A timestamp as ISO 8601 in UTC with a Z."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def stream_rows(
    conn: psycopg.Connection[Any], sql: str, args: dict[str, Any], *, check: Check, name: str
) -> Iterator[list[dict[str, Any]]]:
    """Batches of rows from a server-side cursor, checking for cancellation between batches."""
    with conn.cursor(name=name) as cur:
        cur.execute(sql, args)
        while batch := cur.fetchmany(BATCH_ROWS):
            check()
            yield batch


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {name: row[name] for name in COLUMNS}
    out["period_start"] = row["period_start"].isoformat()
    out["first_seen"] = iso_utc(row["first_seen"])
    out["last_seen"] = iso_utc(row["last_seen"])
    return out


def write_summary(conn: psycopg.Connection[Any], sink: Any, *, params: dict[str, Any], check: Check) -> int:
    """Write the summary in the requested format to a binary stream; returns the row count."""
    fmt = params["format"]
    batches = stream_rows(conn, SUMMARY_SQL, query_args(params), check=check, name="export_summary")
    count = 0
    if fmt == "parquet":
        with pq.ParquetWriter(sink, ARROW_SCHEMA) as writer:
            for batch in batches:
                writer.write_table(pa.Table.from_pylist(batch, schema=ARROW_SCHEMA))
                count += len(batch)
        return count
    text = io.TextIOWrapper(sink, encoding="utf-8", newline="")
    try:
        if fmt == "csv":
            writer_csv = csv.writer(text, lineterminator="\n")
            writer_csv.writerow(COLUMNS)
            for batch in batches:
                for row in batch:
                    values = _json_row(row)
                    writer_csv.writerow(["" if values[c] is None else values[c] for c in COLUMNS])
                count += len(batch)
        else:
            text.write("[")
            for batch in batches:
                for row in batch:
                    text.write(("\n" if count == 0 else ",\n") + json.dumps(_json_row(row)))
                    count += 1
            text.write("\n]\n")
    finally:
        text.flush()
        text.detach()
    return count
