"""The decision rule: accept / review / unassigned from the top-1 similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Decision = Literal["auto", "review", "unassigned"]

DEFAULT_ACCEPT_THRESHOLD = 0.55
"""The historical REID_THRESHOLD (cosine similarity)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Accept at or above ``accept``; ``review`` <= top-1 < ``accept`` waits for a person (None: no review band)."""

    accept: float = DEFAULT_ACCEPT_THRESHOLD
    review: float | None = None

    def __post_init__(self) -> None:
        if not -1 <= self.accept <= 1:
            raise ValueError("accept_threshold must lie in [-1, 1]")
        if self.review is not None and not -1 <= self.review <= self.accept:
            raise ValueError("review_threshold must lie in [-1, accept_threshold]")

    @property
    def review_floor(self) -> float:
        """The lower edge of the review band (equal to accept when there is no band)."""
        return self.accept if self.review is None else self.review


def decide(top1: float | None, thresholds: Thresholds) -> Decision:
    """``auto`` when top-1 >= accept, ``review`` in [review, accept), else ``unassigned`` (also with no profile)."""
    if top1 is None:
        return "unassigned"
    if top1 >= thresholds.accept:
        return "auto"
    if top1 >= thresholds.review_floor:
        return "review"
    return "unassigned"
