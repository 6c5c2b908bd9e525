"""Continual-learning metrics from an accuracy matrix, as an ``evaluate`` module loaded from this local file.

Self-contained on purpose: ``evaluate.load(path_to_this_file)`` copies the file into its module cache and imports
it on its own, so it may import nothing from peft_ext. Use it through :func:`peft_ext.trainers.metrics.load_metric`
or :func:`peft_ext.trainers.metrics.compute_continual_metrics`.
"""

import datasets
import evaluate


_DESCRIPTION = """
Average incremental accuracy (avg), final accuracy (last), backward transfer (bwt), forgetting and, where the
matrix holds scores of tasks not trained yet, transfer, from the accuracy matrix of a continual run.

Row i holds the accuracies measured after training task i, column j the accuracy on task j (0-based, T tasks).
Entries with j > i (tasks not trained yet) may be None. With a_ij:

    last       = mean_j a_{T-1,j}
    avg        = mean_i ( mean_{j<=i} a_ij )
    bwt        = mean_{j<T-1} ( a_{T-1,j} - a_jj )                     (0.0 when T == 1)
    forgetting = mean_{j<T-1} ( max_{j<=i<T-1} a_ij - a_{T-1,j} )     (0.0 when T == 1)
    transfer   = mean_{j>=1} a_{j-1,j}     (accuracy on a task before training it, as in MTIL; None unless all given)
    fwt        = mean_{j>=1} ( a_{j-1,j} - zero_shot_j )  (forward transfer; None without `zero_shot`)
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_row (`list[list[float | None]]`): the rows of the T x T accuracy matrix, in training order.
    zero_shot (`list[float]`, *optional*): accuracy of each task before any training (for fwt).
Returns:
    dict with `avg`, `last`, `bwt`, `forgetting` (floats), `transfer` and `fwt` (float or None).
Examples:
    >>> metric = evaluate.load("trainers/continual_metrics.py")
    >>> metric.compute(accuracy_row=[[0.9, None], [0.8, 0.7]])["bwt"]
    -0.1
"""


def _mean(values):
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def continual_scores(matrix, zero_shot=None):
    """The metrics of the module docstring from a square matrix (list of rows, None above the diagonal allowed)."""
    rows = [list(r) for r in matrix]
    t = len(rows)
    if t == 0:
        raise ValueError("The accuracy matrix is empty.")
    for i, row in enumerate(rows):
        if len(row) != t:
            raise ValueError(f"The accuracy matrix must be square: row {i} has {len(row)} entries, expected {t}.")
        missing = [j for j in range(i + 1) if row[j] is None]
        if missing:
            raise ValueError(f"Row {i} of the accuracy matrix lacks entries for trained tasks {missing}.")
    a = rows
    last = _mean(a[t - 1])
    avg = _mean(_mean(a[i][: i + 1]) for i in range(t))
    bwt = _mean(a[t - 1][j] - a[j][j] for j in range(t - 1))
    forgetting = _mean(max(a[i][j] for i in range(j, t - 1)) - a[t - 1][j] for j in range(t - 1))
    before = [a[j - 1][j] for j in range(1, t)]
    transfer = _mean(before) if t > 1 and all(v is not None for v in before) else None
    fwt = None
    if transfer is not None and zero_shot is not None:
        if len(zero_shot) != t:
            raise ValueError(f"zero_shot has {len(zero_shot)} entries for {t} tasks.")
        fwt = _mean(a[j - 1][j] - zero_shot[j] for j in range(1, t))
    return {"avg": avg, "last": last, "bwt": bwt, "forgetting": forgetting, "transfer": transfer, "fwt": fwt}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracy_row": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, accuracy_row, zero_shot=None):
        return continual_scores(accuracy_row, zero_shot=zero_shot)
