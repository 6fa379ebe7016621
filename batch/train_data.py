"""Training sets for re-ID fine-tuning: labelled crops on disk with a manifest, and their splits.

A training set is a folder with ``crops/`` (one JPEG per labelled detection, cut with the online path's
crop and margin, at most ``CROP_SIDE_PX`` a side) and ``manifest.csv`` (``file,individual,source``).
Two sources write one:

- ``python -m batch.train_data --from-db OUT``: detections whose identity a person decided (manual
  assignments, including imported Camtrap DP ``individualID``s), labelled by their deer profile.
- ``python -m batch.train_data --demo OUT``: a synthetic set rendered by the demo generator with its own
  seed and individuals, so a model trained on it never saw the demo data set's deer.

Splits are by individual and by image (:func:`split`): training individuals; validation individuals
that have a gallery (known: a few images in the gallery, the rest are queries); and validation
individuals with no gallery (strangers: every image is a query that should stay unassigned).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batch.crops import UnreadableImage, image_path, open_frame
from batch.demo_render import make_individual, render_frame
from serve_app.reid.preprocessing import BBox, crop

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
CROP_SIDE_PX = 192
"""Crops are stored at most this many pixels a side: training inputs are smaller (128-160 px)."""

DEMO_TRAIN_SEED = 1001
"""The demo training set's seed: its individuals are not the demo data set's (seed 7)."""

NIGHT_FRACTION = 10 / 24
"""Share of infrared night frames in the demo training set, as in the demo data (20:00-06:00)."""


@dataclass(frozen=True)
class Sample:
    """One labelled crop."""

    file: str
    individual: str
    source: str


def read_manifest(root: Path) -> list[Sample]:
    """The samples of a training set folder (FileNotFoundError without a manifest)."""
    with (root / MANIFEST).open(newline="") as handle:
        return [Sample(r["file"], r["individual"], r["source"]) for r in csv.DictReader(handle)]


def write_manifest(root: Path, samples: Sequence[Sample]) -> None:
    """Write the manifest atomically (the folder counts as complete once it exists)."""
    tmp = root / (MANIFEST + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "individual", "source"])
        writer.writerows((s.file, s.individual, s.source) for s in samples)
    tmp.replace(root / MANIFEST)


def _save_crop(image: Image.Image, path: Path) -> None:
    if max(image.size) > CROP_SIDE_PX:
        image.thumbnail((CROP_SIDE_PX, CROP_SIDE_PX), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=92)


def _render_demo_crop(args: tuple[int, int, int, bool, str]) -> str:
    seed, individual, frame_seed, night, path = args
    data, (x, y, w, h) = render_frame(make_individual(seed, individual), frame_seed=frame_seed, night=night)
    with Image.open(io.BytesIO(data)) as frame:
        _save_crop(crop(frame.convert("RGB"), BBox(x, y, w, h)), Path(path))
    return path


def render_demo_set(
    out: Path,
    *,
    seed: int = DEMO_TRAIN_SEED,
    individuals: int = 100,
    per_individual: int = 24,
    workers: int | None = None,
) -> list[Sample]:
    """Render a synthetic training set: ``individuals`` deer of ``seed``, ``per_individual`` frames each, with
    the demo's variation (pose, scale, flip, light, infrared night, blur, noise). Deterministic; a complete
    set already there is reused."""
    params = {"seed": seed, "individuals": individuals, "per_individual": per_individual}
    if (out / MANIFEST).is_file() and (out / "params.json").is_file():
        if json.loads((out / "params.json").read_text()) == params:
            return read_manifest(out)
    rng = random.Random(seed)
    jobs, samples = [], []
    for individual in range(individuals):
        for k in range(per_individual):
            name = f"crops/{individual:04d}/{k:03d}.jpg"
            jobs.append((seed, individual, rng.getrandbits(48), rng.random() < NIGHT_FRACTION, str(out / name)))
            samples.append(Sample(name, f"demo{seed}-{individual:04d}", "demo"))
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for done, _ in enumerate(pool.map(_render_demo_crop, jobs, chunksize=8), start=1):
            if done % 500 == 0 or done == len(jobs):
                logger.info("rendered %d/%d training crops", done, len(jobs))
    (out / "params.json").write_text(json.dumps(params))
    write_manifest(out, samples)
    return samples


def export_labelled(
    dsn: str, out: Path, *, image_root: Path, sites: Sequence[int] | None = None, min_per_individual: int = 2
) -> list[Sample]:
    """Crops of detections a person assigned (``decision = 'manual'``), labelled by deer profile; profiles
    with fewer than ``min_per_individual`` such detections are left out (they can be neither trained on
    nor validated)."""
    from serve_app.store.db import connect

    query = (
        "SELECT d.id, d.deer_id, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, i.uri FROM detections d"
        " JOIN images i ON i.id = d.image_id JOIN cameras c ON c.id = i.camera_id"
        " WHERE d.decision = 'manual' AND d.deer_id IS NOT NULL"
    )
    params: list[Any] = []
    if sites:
        query += " AND c.site_id = ANY(%s)"
        params.append(list(sites))
    with connect(dsn) as conn:
        rows = conn.execute(query + " ORDER BY d.id", params).fetchall()
    by_deer: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_deer[int(row["deer_id"])].append(row)
    samples: list[Sample] = []
    skipped = 0
    for deer_id, detections in sorted(by_deer.items()):
        if len(detections) < min_per_individual:
            continue
        for row in detections:
            name = f"crops/{deer_id}/{row['id']}.jpg"
            try:
                frame = open_frame(image_path(str(row["uri"]), root=image_root))
                box = BBox(row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
                _save_crop(crop(frame, box), out / name)
            except (UnreadableImage, ValueError) as exc:
                skipped += 1
                logger.warning("detection %s left out: %s", row["id"], exc)
                continue
            samples.append(Sample(name, f"deer{deer_id}", "manual"))
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, samples)
    logger.info("exported %d labelled crops of %d profiles (%d unreadable)", len(samples), len(by_deer), skipped)
    return samples


@dataclass(frozen=True)
class Split:
    """Indices into a sample list: training, validation gallery, known queries and stranger queries."""

    train: list[int]
    gallery: list[int]
    known_queries: list[int]
    stranger_queries: list[int]

    def counts(self) -> dict[str, int]:
        """Sizes, for the model card."""
        return {
            "train": len(self.train),
            "gallery": len(self.gallery),
            "known_queries": len(self.known_queries),
            "stranger_queries": len(self.stranger_queries),
        }


def split(
    samples: Sequence[Sample],
    *,
    seed: int,
    val_fraction: float = 0.25,
    gallery_per_individual: int = 3,
    stranger_fraction: float = 0.5,
) -> Split:
    """Split by individual (``val_fraction`` of them held out) and, among held-out known individuals, by image
    (``gallery_per_individual`` gallery images, the rest queries); ``stranger_fraction`` of the held-out
    individuals get no gallery."""
    by_individual: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_individual[sample.individual].append(index)
    names = sorted(by_individual)
    rng = random.Random(seed)
    rng.shuffle(names)
    held = max(2, round(len(names) * val_fraction)) if len(names) >= 4 and val_fraction > 0 else 0
    strangers = names[: round(held * stranger_fraction)]
    known = names[len(strangers) : held]
    out = Split([], [], [], [])
    for name in names[held:]:
        out.train.extend(by_individual[name])
    for name in strangers:
        out.stranger_queries.extend(by_individual[name])
    for name in known:
        images = list(by_individual[name])
        rng.shuffle(images)
        out.gallery.extend(images[:gallery_per_individual])
        out.known_queries.extend(images[gallery_per_individual:])
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: write a training set from the database's manual assignments or from the demo generator."""
    parser = argparse.ArgumentParser(prog="python -m batch.train_data", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-db", type=Path, metavar="OUT", help="crops of manually assigned detections")
    source.add_argument("--demo", type=Path, metavar="OUT", help="a synthetic set with its own seed and deer")
    parser.add_argument("--seed", type=int, default=DEMO_TRAIN_SEED, help="demo set: its seed")
    parser.add_argument("--individuals", type=int, default=100, help="demo set: how many deer")
    parser.add_argument("--per-individual", type=int, default=24, help="demo set: frames per deer")
    parser.add_argument("--sites", type=int, nargs="*", help="from the database: only these site ids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.demo:
        samples = render_demo_set(
            args.demo, seed=args.seed, individuals=args.individuals, per_individual=args.per_individual
        )
        print(f"{len(samples)} crops of {args.individuals} individuals in {args.demo}")
        return 0
    from serve_app.config import get_settings

    settings = get_settings()
    samples = export_labelled(
        settings.database_dsn, args.from_db, image_root=Path(settings.image_root), sites=args.sites
    )
    print(f"{len(samples)} crops of {len({s.individual for s in samples})} profiles in {args.from_db}")
    return 0 if samples else 1


if __name__ == "__main__":
    raise SystemExit(main())
