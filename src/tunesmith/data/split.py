"""The eval hold-out: chosen first, from line positions and a seed only — before any validation or cleaning
decision can influence which examples are scored (the guide: "hold out 5–10% as eval set before any cleaning")."""

from __future__ import annotations

import random


def holdout_indices(n: int, fraction: float, seed: int) -> set[int]:
    """Indices (of ``n`` input examples) held out for eval: ``round(n × fraction)`` of them, at least one when
    ``fraction > 0`` and there are two or more examples, never all. Same ``n``, fraction and seed → same set."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(n * fraction)))
    return set(random.Random(seed).sample(range(n), k))
