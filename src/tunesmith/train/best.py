"""Which evaluation was the best, whether to stop early, and whether the curves show over-fitting.

Pure functions of the evaluations so far: the loop asks them after each evaluation, tests pass crafted curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError

LOWER_IS_BETTER = frozenset({"eval_loss", "eval_perplexity"})
HIGHER_IS_BETTER = frozenset({"eval_token_accuracy"})
"""The loop's own eval metrics; every ``task_<metric>`` is a mean score in [0, 1], higher is better."""


def greater_is_better(metric: str, given: bool | None, task_metrics: Sequence[str]) -> bool:
    """Whether a higher ``metric`` is better: ``given`` when set, else known for the loop's eval metrics and the
    task metrics (``task_<name>`` for each name in ``task_metrics``); any other name is a UserError."""
    known = LOWER_IS_BETTER | HIGHER_IS_BETTER | {f"task_{n}" for n in task_metrics}
    if metric not in known:
        names = ", ".join(sorted(known))
        raise UserError(f"train.metric_for_best_model: {metric!r} is not computed by this run's evaluations",
                        hint=f"use one of {names} (task_<metric> needs train.task_eval_samples > 0 and that "
                             "metric in eval.metrics)")
    if given is not None:
        return given
    return metric not in LOWER_IS_BETTER


@dataclass(frozen=True)
class Selection:
    """The best evaluation so far and what the loop should do after the latest one."""

    best_step: int | None
    best_value: float | None
    latest_is_best: bool
    """The latest evaluation is the new best (the loop keeps its weights)."""
    evaluations_since_best: int
    """Evaluations after the best one that did not improve on it by more than the threshold."""
    stop: bool
    """Early stopping: ``evaluations_since_best`` reached the patience."""


def select(evaluations: Sequence[tuple[int, float]], *, greater: bool, patience: int | None = None,
           threshold: float = 0.0) -> Selection:
    """The best of ``evaluations`` ((step, value), in step order): a value is an improvement when it beats the best
    so far by more than ``threshold`` (absolute, in the metric's units), and the best moves only on an
    improvement. ``patience``: stop after that many evaluations in a row without one (None: never stop)."""
    best_step: int | None = None
    best_value: float | None = None
    since = 0
    for step, value in evaluations:
        improved = best_value is None or (value - best_value if greater else best_value - value) > threshold
        if improved:
            best_step, best_value, since = step, value, 0
        else:
            since += 1
    latest = evaluations[-1][0] if evaluations else None
    return Selection(best_step, best_value, latest is not None and latest == best_step, since,
                     patience is not None and since >= patience)


def overfitting(train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]],
                min_rise: float = 0.01) -> str | None:
    """A warning when eval loss rose after its lowest point (by more than ``min_rise`` of it) while train loss
    fell over the same steps — the model learns the training examples instead of the task; None otherwise.
    ``train``/``evals``: (step, loss) in step order."""
    if len(evals) < 2:
        return None
    low_step, low = min(evals, key=lambda e: e[1])
    last_step, last = evals[-1]
    if last_step == low_step or last <= low * (1 + min_rise):
        return None
    at_low = [loss for step, loss in train if step <= low_step]
    after = [loss for step, loss in train if low_step < step <= last_step]
    if not at_low or not after or min(after) >= at_low[-1]:
        return None
    return (f"over-fitting: eval loss rose from {low:.4f} at step {low_step} to {last:.4f} at step {last_step} "
            f"while train loss fell from {at_low[-1]:.4f} to {after[-1]:.4f}. Train for fewer epochs "
            "(train.num_train_epochs), lower train.learning_rate, add more data, or set "
            "train.early_stopping_patience with train.load_best_model_at_end: true to keep the best step's weights")
