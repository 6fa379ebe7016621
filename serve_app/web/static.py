"""Static files served at /static from the package's own static/ directory (vendored assets, docs scripts)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

STATIC_PREFIX = "/static"
STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Inside the installed package (package data), so an installed wheel serves the same files as a checkout."""


def mount_static(app: FastAPI) -> None:
    """Serve STATIC_DIR at /static (outside the OpenAPI schema)."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
