"""Continual-learning metrics (Avg, Last, BWT, Forgetting, Transfer) through ``evaluate``, offline.

``evaluate.load("accuracy")`` and friends download a script from the Hub; the continual metrics are instead a local
module file (``continual_metrics.py`` beside this one) that ``evaluate.load`` imports from disk. Definitions: see
that file and ``docs/cli.md`` -- they work from the accuracy matrix alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import evaluate


METRIC_SCRIPT = Path(__file__).resolve().parent / "continual_metrics.py"


def load_metric(**kwargs) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the local continual-metrics module (no network); kwargs go to ``evaluate.load``."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRIC_SCRIPT), **kwargs)


def compute_continual_metrics(
    matrix: Sequence[Sequence[Optional[float]]], zero_shot: Optional[Sequence[float]] = None
) -> dict[str, Optional[float]]:
    """Avg, Last, BWT, Forgetting, Transfer and FWT of a T x T accuracy matrix (row i: after training task i)."""
    metric = load_metric()
    kwargs = {} if zero_shot is None else {"zero_shot": list(zero_shot)}
    return metric.compute(accuracy_row=[list(r) for r in matrix], **kwargs)


__all__ = ["METRIC_SCRIPT", "compute_continual_metrics", "load_metric"]
