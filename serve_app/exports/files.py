"""The export file store: a local folder by default, any pyarrow filesystem URI in production."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
EXTENSIONS = {"csv": "csv", "parquet": "parquet", "json": "json", "camtrap-dp": "zip"}
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "json": "application/json",
    "camtrap-dp": "application/zip",
}


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and base path for a folder or URI (relative folders become absolute)."""
    if "://" in location:
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, str(path).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(location)


def file_uri(export_dir: str, job_id: str, fmt: str) -> str:
    """Where a job's file lives: ``<export_dir>/<job id>.<ext>``."""
    base = export_dir if "://" in export_dir else os.path.abspath(export_dir)
    return f"{base.rstrip('/')}/{job_id}.{EXTENSIONS[fmt]}"


class ExportFiles:
    """Blocking file operations; async callers run them in a thread."""

    def __init__(self, location: str) -> None:
        self.fs, self.base = _resolve(location)

    def _path(self, uri: str) -> str:
        if "://" in uri:
            return str(pafs.FileSystem.from_uri(uri)[1])
        return uri

    def open_part(self, uri: str) -> Any:
        """An output stream for the job's temporary ``.part`` file (renamed by ``publish``)."""
        self.fs.create_dir(self.base, recursive=True)
        return self.fs.open_output_stream(self._path(uri) + PART_SUFFIX)

    def publish(self, uri: str) -> None:
        """Move the finished ``.part`` file to its final name."""
        path = self._path(uri)
        self.fs.move(path + PART_SUFFIX, path)

    def remove(self, uri: str) -> None:
        """Delete the job's file and its ``.part`` file, whichever exist."""
        path = self._path(uri)
        for candidate in (path, path + PART_SUFFIX):
            try:
                self.fs.delete_file(candidate)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a missing object is not an error; anything else is logged
                if "not found" not in str(exc).lower() and "no such file" not in str(exc).lower():
                    logger.warning("could not remove %s: %s", candidate, exc)

    def size_bytes(self, uri: str) -> int | None:
        """The file's size, or None when it does not exist."""
        info = self.fs.get_file_info(self._path(uri))
        return int(info.size) if info.type == pafs.FileType.File else None

    def chunks(self, uri: str) -> Iterator[bytes]:
        """The file's bytes in chunks (a sync iterator: Starlette runs it in a thread)."""
        with self.fs.open_input_stream(self._path(uri)) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield bytes(chunk)

    def sweep(self, *, older_than_s: float) -> int:
        """Delete files in the store older than the given age; returns how many went."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except OSError as exc:
            logger.warning("cannot list export store %s: %s", self.base, exc)
            return 0
        cutoff_ns = (time.time() - older_than_s) * 1e9
        removed = 0
        for info in infos:
            if info.type != pafs.FileType.File or info.mtime_ns is None or info.mtime_ns >= cutoff_ns:
                continue
            try:
                self.fs.delete_file(info.path)
                removed += 1
            except OSError as exc:
                logger.warning("could not sweep %s: %s", info.path, exc)
        return removed
