"""GET /readyz and /healthz through Serve (HAProxy ingress) vs the same FastAPI app on bare uvicorn."""

from __future__ import annotations

from benchmarks.common import HttpCase, bench_settings, prepare_database, serve_vs_uvicorn, write_results


def main() -> None:
    """Both servers at 1 and 16 connections in alternating rounds, then the Serve/uvicorn ratios."""
    settings = bench_settings()
    prepare_database(settings)
    cases = [HttpCase(f"GET {path}", path) for path in ("/healthz", "/readyz")]
    rows = serve_vs_uvicorn(settings, cases)
    write_results("api_health", rows)


if __name__ == "__main__":
    main()
