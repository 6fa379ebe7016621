"""GET /readyz and /healthz through Serve (HAProxy ingress) vs the same FastAPI app on bare uvicorn."""

from __future__ import annotations

from benchmarks.common import (
    api_app_args,
    bench_settings,
    http_rows,
    interleaved_load,
    load,
    prepare_database,
    serve_app,
    uvicorn_app,
    write_results,
)

ROUNDS = 3
ROUND_S = 3.0  # per server per round; figures are medians over the rounds


def main() -> None:
    """Both servers at 1 and 16 connections in alternating rounds, then the Serve/uvicorn ratios."""
    settings = bench_settings()
    prepare_database(settings)
    rows = []
    with uvicorn_app(settings) as uvicorn_url, serve_app(api_app_args(settings)) as serve_url:
        urls = {"uvicorn": uvicorn_url, "serve": serve_url}
        for path in ("/healthz", "/readyz"):
            for url in urls.values():  # warm-up
                load(url + path, connections=4, duration_s=1)
            for conns in (1, 16):
                measured = interleaved_load(urls, path, rounds=ROUNDS, duration_s=ROUND_S, connections=conns)
                for server in urls:
                    rows += http_rows(f"GET {path} {server} c={conns}", measured.median(server))
                ratio = measured.ratio("serve", "uvicorn")
                rows.append(
                    {"case": f"GET {path} c={conns}", "metric": "serve/uvicorn", "value": ratio, "unit": "x req/s"}
                )
    write_results("api_health", rows)


if __name__ == "__main__":
    main()
