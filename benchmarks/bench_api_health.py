"""GET /readyz and /healthz through Serve (HAProxy ingress) vs the same FastAPI app on bare uvicorn."""

from __future__ import annotations

from benchmarks.common import (
    api_app_args,
    bench_settings,
    http_rows,
    load,
    prepare_database,
    serve_app,
    uvicorn_app,
    write_results,
)

DURATION_S = 5.0


def main() -> None:
    """Measure both servers at 1 and 16 connections, then the Serve/uvicorn ratios."""
    settings = bench_settings()
    prepare_database(settings)
    rows = []
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    for server, ctx in (("uvicorn", uvicorn_app(settings)), ("serve", serve_app(api_app_args(settings)))):
        with ctx as url:
            for path in ("/healthz", "/readyz"):
                load(url + path, connections=4, duration_s=1)  # warm-up
                for conns in (1, 16):
                    res = load(url + path, connections=conns, duration_s=DURATION_S)
                    results[(server, path, conns)] = res
                    rows += http_rows(f"GET {path} {server} c={conns}", res)
    for path in ("/healthz", "/readyz"):
        for conns in (1, 16):
            ratio = results[("serve", path, conns)]["rps"] / max(results[("uvicorn", path, conns)]["rps"], 1e-9)
            rows.append({"case": f"GET {path} c={conns}", "metric": "serve/uvicorn", "value": ratio, "unit": "x req/s"})
    write_results("api_health", rows)


if __name__ == "__main__":
    main()
