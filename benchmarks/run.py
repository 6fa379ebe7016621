"""Run every benchmarks/bench_*.py (each in its own process) and print one markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def markdown_table(paths: list[Path]) -> str:
    """One table of all result files."""
    lines = ["| benchmark | case | metric | value | unit | target |", "|---|---|---|---:|---|---|"]
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            lines.append(
                f"| {data['benchmark']} | {row['case']} | {row['metric']} | {row['value']:.3f} | {row['unit']} "
                f"| {row.get('target') or ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run the selected (default: all) benchmarks; returns non-zero when one failed."""
    wanted = set(argv)
    benches = sorted(p for p in (ROOT / "benchmarks").glob("bench_*.py") if not wanted or p.stem in wanted)
    started = time.time()
    failed = []
    for bench in benches:
        print(f"== {bench.stem}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{bench.stem}"], cwd=ROOT, check=False)
        if proc.returncode != 0:
            failed.append(bench.stem)
    fresh = sorted(p for p in RESULTS.glob("*.json") if p.stat().st_mtime >= started)
    print()
    print(markdown_table(fresh))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
