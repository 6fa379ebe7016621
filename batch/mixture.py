"""A two-Gaussian mixture fitted by EM to binned top-1 similarities, and the threshold it implies.

Binned EM (counts per bin) keeps the fit independent of the number of score rows. The threshold is
where the two weighted densities cross between the means; it is trusted only when the components
are well separated (Ashman's D > 2), with a real dip between them, and neither is negligible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_SEPARATION_D = 2.0
MIN_WEIGHT = 0.05
MIN_SAMPLES = 50
ITERATIONS = 300
MAX_VALLEY = 0.5
"""The mixture density at the threshold, at most this fraction of the lower peak's."""


@dataclass(frozen=True)
class MixtureFit:
    """Fitted components (low, high), the crossing threshold and whether to trust it."""

    means: tuple[float, float]
    stds: tuple[float, float]
    weights: tuple[float, float]
    separation_d: float
    threshold: float | None
    trusted: bool
    reason: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _normal(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    result: np.ndarray = np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    return result


def fit_mixture(centers: np.ndarray, counts: np.ndarray) -> MixtureFit | None:
    """EM on a histogram; None when there are no scores."""
    x = np.asarray(centers, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return None
    cdf = np.cumsum(n) / total
    mean_all = float((x * n).sum() / total)
    std_all = float(np.sqrt(((x - mean_all) ** 2 * n).sum() / total))
    bin_width = float(np.min(np.diff(x))) if len(x) > 1 else 1e-3
    floor = max(bin_width, std_all / 10)  # no component narrower than a bin: binned EM would collapse
    mu = np.array([x[np.searchsorted(cdf, 0.25)], x[np.searchsorted(cdf, 0.75)]], dtype=np.float64)
    sd = np.array([max(std_all / 2, floor)] * 2)
    w = np.array([0.5, 0.5])
    for _ in range(ITERATIONS):
        dens = np.stack([w[k] * _normal(x, mu[k], sd[k]) for k in range(2)]) + 1e-300
        resp = dens / dens.sum(axis=0) * n
        nk = resp.sum(axis=1) + 1e-12
        mu = (resp * x).sum(axis=1) / nk
        sd = np.maximum(np.sqrt((resp * (x - mu[:, None]) ** 2).sum(axis=1) / nk), floor)
        w = nk / nk.sum()
    order = np.argsort(mu)
    mu, sd, w = mu[order], sd[order], w[order]
    d = float(np.sqrt(2) * abs(mu[1] - mu[0]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2))
    grid = np.linspace(mu[0], mu[1], 2001)
    diff = w[0] * _normal(grid, mu[0], sd[0]) - w[1] * _normal(grid, mu[1], sd[1])
    crossings = np.flatnonzero(np.diff(np.sign(diff)) != 0)
    threshold = float(grid[crossings[0]]) if len(crossings) and mu[1] > mu[0] else None

    def mix(v: float) -> float:
        return float(sum(w[k] * _normal(np.array([v]), mu[k], sd[k])[0] for k in range(2)))

    valley = mix(threshold) / min(mix(mu[0]), mix(mu[1])) if threshold is not None else 1.0
    if total < MIN_SAMPLES:
        trusted, reason = False, f"only {int(total)} scores (need {MIN_SAMPLES})"
    elif threshold is None:
        trusted, reason = False, "the two components do not cross between their means"
    elif d <= MIN_SEPARATION_D:
        trusted, reason = False, f"scores are not bimodal enough (separation D = {d:.2f}, need > {MIN_SEPARATION_D})"
    elif valley > MAX_VALLEY:
        trusted, reason = False, f"no clear dip between the components (valley at {valley:.0%} of the lower peak)"
    elif w.min() < MIN_WEIGHT:
        trusted, reason = False, f"one component holds only {w.min():.1%} of the scores"
    else:
        trusted, reason = True, f"two well separated components (D = {d:.2f})"
    return MixtureFit(
        means=(float(mu[0]), float(mu[1])),
        stds=(float(sd[0]), float(sd[1])),
        weights=(float(w[0]), float(w[1])),
        separation_d=d,
        threshold=threshold,
        trusted=trusted,
        reason=reason,
    )
