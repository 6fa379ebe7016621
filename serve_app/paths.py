"""One path-confinement rule for every path a client or a package names under a root folder.

The API's image URIs, the batch jobs' stored URIs and the Camtrap DP importer's destinations all go
through :func:`confine`, so a path refused in one place is refused in all of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from serve_app.errors import PathRefused as PathRefused

NAME_MAX_BYTES = 255
"""Longest file or folder name the file systems we run on accept, in bytes (Linux NAME_MAX)."""

PATH_MAX_BYTES = 4095
"""Longest whole path (root included) a system call accepts, in bytes (Linux PATH_MAX minus the NUL)."""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


REASONS = ("empty", "nul", "scheme", "absolute", "parent", "too-long", "outside", "unresolvable")
"""Every :class:`PathRefused` reason :func:`confine` gives."""


def confine(path: str, *, root: Path) -> tuple[Path, str]:
    """The real path of ``path`` under ``root`` and its canonical form relative to it; refuses anything else.

    Refused: an empty path, a NUL byte, a scheme (``http:``, ``file:``, ``//host``), an absolute path, a
    ``..`` component, a name or path longer than the file system allows, and anything whose real path
    (symlinks followed) is not strictly inside the root. The path need not exist.
    """
    if not path:
        raise PathRefused("empty", "the path is empty")
    if "\x00" in path:
        raise PathRefused("nul", "the path contains a NUL byte")
    if _SCHEME.match(path) or path.startswith(("//", "\\\\")):
        raise PathRefused("scheme", "the path must be a path under the root, not a URL")
    if os.path.isabs(path):
        raise PathRefused("absolute", "the path must be relative to the root")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise PathRefused("parent", "the path may not contain '..'")
    real_root = os.path.realpath(root)
    if any(len(os.fsencode(part)) > NAME_MAX_BYTES for part in parts):
        raise PathRefused("too-long", f"a name in the path is longer than {NAME_MAX_BYTES} bytes")
    if len(os.fsencode(real_root)) + 1 + len(os.fsencode(path)) > PATH_MAX_BYTES:
        raise PathRefused("too-long", f"the path is longer than {PATH_MAX_BYTES} bytes under the root")
    try:
        real = Path(os.path.realpath(os.path.join(real_root, path)))
    except (OSError, ValueError) as exc:
        raise PathRefused("unresolvable", f"the path cannot be resolved: {type(exc).__name__}") from exc
    if Path(real_root) not in real.parents:
        raise PathRefused("outside", "the path resolves outside the root")
    return real, real.relative_to(real_root).as_posix()
