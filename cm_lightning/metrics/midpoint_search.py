"""The authors' ternary search for the best two-step midpoint (how the CM paper picks its published
``ts`` such as (0, 22, 39); their ``scripts/ternary_search.py``): FID of the sampling plan (begin, p, end)
is taken as unimodal in the grid index p, and the bracket shrinks by a third per round. Every
candidate is scored once, with the same seed, so that candidates differ only by their midpoint.
"""

from collections.abc import Callable

from cm_lightning.errors import ConfigError


def ternary_search(
    score: Callable[[int], float], low: int, high: int, max_evals: int | None = None
) -> tuple[int, dict[int, float]]:
    """Argmin of ``score`` over the integers in [low, high] and every score taken, by index.

    Each round scores the two inner third-points m1 < m2 and keeps [low, m2] when score(m1) <
    score(m2), else [m1, high]; once fewer than four indices remain they are all scored. With
    ``max_evals`` the search stops when that many candidates have been scored (the sample budget).
    """
    if low > high or (max_evals is not None and max_evals < 1):
        raise ConfigError(f"nothing to search: interval [{low}, {high}], max_evals={max_evals}")
    scores: dict[int, float] = {}

    def budget_left() -> bool:
        return max_evals is None or len(scores) < max_evals

    def f(p: int) -> float:
        if p not in scores:
            scores[p] = float(score(p))
        return scores[p]

    while high - low >= 3 and (max_evals is None or len(scores) + 2 <= max_evals):
        m1, m2 = low + (high - low) // 3, high - (high - low) // 3
        if f(m1) < f(m2):
            high = m2
        else:
            low = m1
    # What is left of the budget goes to the remaining indices, nearest the middle first.
    for p in sorted(range(low, high + 1), key=lambda p: abs(2 * p - low - high)):
        if budget_left():
            f(p)
    return min(scores, key=scores.get), scores
