"""Write a development API key for all sites to a file, keeping a still-valid one."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serve_app.config import get_settings  # noqa: E402
from serve_app.keys import create_key, find_key  # noqa: E402
from serve_app.store.db import connect  # noqa: E402


def main(path: Path) -> int:
    """Reuse the key in ``path`` while it is active; otherwise create one and write it there."""
    settings = get_settings()
    with connect(settings.database_dsn) as conn:
        if path.exists():
            key = path.read_text().strip()
            if find_key(conn, key=key, pepper=settings.key_pepper) is not None:
                print(f"development key (all sites) in {path}: {key}")
                return 0
        key = create_key(conn, sites=None, pepper=settings.key_pepper, label="development (make run)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    print(f"created a development key (all sites), saved in {path}: {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
