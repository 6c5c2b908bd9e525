"""Continual-learning metrics from an accuracy matrix, as an ``evaluate`` module loaded from this local file.

Self-contained on purpose: ``evaluate.load(path_to_this_file)`` copies the file into its module cache and imports
it on its own, so it may import nothing from peft_ext. Use it through :func:`peft_ext.trainers.metrics.load_metric`
or :func:`peft_ext.trainers.metrics.compute_continual_metrics`.
"""

import datasets
import evaluate


_DESCRIPTION = """
Average incremental accuracy (avg), final accuracy (last), backward transfer (bwt), forgetting and, where the
matrix also holds the scores of tasks not trained yet, MTIL's Transfer and Avg (transfer, avg_all) and forward
transfer (fwt), from the accuracy matrix of a continual run.

Row i holds the accuracies measured after training task i, column j the accuracy on task j (0-based, T tasks).
Entries with j > i (tasks not trained yet) may be None. With a_ij:

    last       = mean_j a_{T-1,j}
    avg        = mean_i ( mean_{j<=i} a_ij )                            (average incremental accuracy)
    bwt        = mean_{j<T-1} ( a_{T-1,j} - a_jj )                      (0.0 when T == 1)
    forgetting = mean_{j<T-1} ( max_{j<=i<T-1} a_ij - a_{T-1,j} )      (0.0 when T == 1)
    transfer   = mean_{j>=1} ( mean_{i<j} a_ij )                        (MTIL's Transfer, ZSCL paper)
    avg_all    = mean_{i,j} a_ij                                        (MTIL's Avg)
    fwt        = mean_{j>=1} ( mean_{i<j} a_ij - zero_shot_j )          (= transfer - mean_{j>=1} zero_shot_j)

transfer is the accuracy on a task before it is trained, averaged over every earlier step, then over tasks 1..T-1.
transfer and avg_all are None unless every entry above the diagonal is given (a partial upper triangle would
average a different set of cells per task), and transfer is None when T == 1 (no task has an earlier step).
fwt is transfer measured against the model before any training: None without `zero_shot` or without transfer.
`zero_shot` (accuracy of each task before any training) is a separate row, never a row of the matrix: it does not
enter transfer or avg_all.
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_row (`list[list[float | None]]`): the rows of the T x T accuracy matrix, in training order.
    zero_shot (`list[float]`, *optional*): accuracy of each of the T tasks before any training (for fwt).
Returns:
    dict with `avg`, `last`, `bwt`, `forgetting` (floats), `transfer`, `avg_all` and `fwt` (float or None).
Examples:
    >>> metric = evaluate.load("trainers/continual_metrics.py")
    >>> metric.compute(accuracy_row=[[0.9, 0.5], [0.8, 0.7]])["transfer"]
    0.5
"""


def _mean(values):
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def continual_scores(matrix, zero_shot=None):
    """The metrics of the module docstring from a square matrix (list of rows, None above the diagonal allowed)."""
    a = [list(r) for r in matrix]
    t = len(a)
    if t == 0:
        raise ValueError("The accuracy matrix is empty.")
    for i, row in enumerate(a):
        if len(row) != t:
            raise ValueError(f"The accuracy matrix must be square: row {i} has {len(row)} entries, expected {t}.")
        missing = [j for j in range(i + 1) if row[j] is None]
        if missing:
            raise ValueError(f"Row {i} of the accuracy matrix lacks entries for trained tasks {missing}.")
    if zero_shot is not None:
        zero_shot = list(zero_shot)
        if len(zero_shot) != t:
            raise ValueError(f"zero_shot has {len(zero_shot)} entries for {t} tasks.")
        if any(v is None for v in zero_shot):
            raise ValueError("zero_shot lacks entries: give the accuracy of every task before training.")
    last = _mean(a[t - 1])
    avg = _mean(_mean(a[i][: i + 1]) for i in range(t))
    bwt = _mean(a[t - 1][j] - a[j][j] for j in range(t - 1))
    forgetting = _mean(max(a[i][j] for i in range(j, t - 1)) - a[t - 1][j] for j in range(t - 1))
    # The lower triangle is checked above, so the matrix is complete exactly when the upper triangle is.
    complete = all(a[i][j] is not None for j in range(t) for i in range(j))
    before = [_mean(a[i][j] for i in range(j)) for j in range(1, t)] if complete else []
    transfer = _mean(before) if before else None
    avg_all = _mean(v for row in a for v in row) if complete else None
    fwt = None
    if transfer is not None and zero_shot is not None:
        fwt = _mean(before[j - 1] - zero_shot[j] for j in range(1, t))
    return {
        "avg": avg,
        "last": last,
        "bwt": bwt,
        "forgetting": forgetting,
        "transfer": transfer,
        "avg_all": avg_all,
        "fwt": fwt,
    }


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
